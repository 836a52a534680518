"""Task spec validation: every shipped spec loads; mistakes fail with a message naming the field."""

from __future__ import annotations

import copy

import pytest
import yaml

from kit import registry
from kit.datasets.config import load_config
from kit.errors import KitError
from verticals.clinical.spec import load_task_spec, parse_task_spec

BASE = {
    "name": "my_task",
    "description": "readmission",
    "type": "binary",
    "cohort": {"encounter_classes": ["INPATIENT"], "require_end": True},
    "prediction_time": {"at": "encounter_end"},
    "horizon": {"days": 30},
    "label": {"rule": "encounter", "classes": ["INPATIENT"]},
    "prompt": "Readmitted?",
}


def _with(path: str, value) -> dict:
    d = copy.deepcopy(BASE)
    node = d
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    return d


def _error(data: dict) -> str:
    with pytest.raises(KitError) as exc:
        parse_task_spec(data, "spec.yaml")
    return str(exc.value)


def test_shipped_specs_load_through_the_registry():
    v = registry.vertical("clinical")
    specs = v.load_tasks(None, [])
    assert {s.name for s in specs} >= {
        "mortality_in_hospital", "mortality_30d_post_discharge", "mortality_1y", "readmission_30d", "long_los",
        "next_encounter_type_90d", "new_diagnosis_1y", "forecast_next_events",
    }
    for s in specs:  # each shipped file is also a valid standalone spec a user can copy
        assert load_task_spec(v.task_spec_path(s.name)) == s


@pytest.mark.parametrize(
    "data, field",
    [
        (_with("cohort.encounter_kind", "x"), "unknown field `cohort.encounter_kind`"),
        (_with("colour", "red"), "unknown field `colour`"),
        (_with("label.classes", ["HOSPITAL"]), "field `label.classes`: unknown encounter class 'HOSPITAL'"),
        (_with("type", "multiclass"), "field `type`"),
        (_with("metric", "accuracy"), "field `metric`"),
        (_with("name", "My Task"), "field `name`"),
        (_with("horizon", {}), "field `horizon.days`"),
        (_with("label", {"rule": "length_of_stay", "min_days": 7}), "field `prediction_time.at`"),
        (_with("label", {"rule": "teleport"}), "field `label.rule`"),
        (_with("horizon.days", -3), "horizon.days"),
        ({k: v for k, v in BASE.items() if k != "prompt"}, "missing field `prompt`"),
    ],
)
def test_spec_errors_name_the_field(data, field):
    msg = _error(data)
    assert msg.startswith("task spec spec.yaml:")
    assert field in msg, msg


def test_impossible_length_of_stay_threshold():
    data = _with("label", {"rule": "length_of_stay", "min_days": 0.5})
    data["prediction_time"] = {"at": "encounter_start", "offset_hours": 24}
    data.pop("horizon")
    assert "field `label.min_days`" in _error(data)
    data["label"]["min_days"] = 7
    assert parse_task_spec(data).label.min_days == 7


def test_spec_files_yaml_toml_and_bad_input(tmp_path):
    y = tmp_path / "t.yaml"
    y.write_text(yaml.safe_dump(BASE))
    assert load_task_spec(y).name == "my_task"
    t = tmp_path / "t.toml"
    t.write_text(
        'name = "my_task"\ndescription = "d"\ntype = "binary"\nprompt = "p"\n'
        '[prediction_time]\nat = "encounter_end"\n[horizon]\ndays = 30\n[label]\nrule = "death"\n'
    )
    assert load_task_spec(t).label.rule == "death"
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(KitError, match="broken.yaml: not valid YAML"):
        load_task_spec(broken)
    with pytest.raises(KitError, match="file not found"):
        load_task_spec(tmp_path / "missing.yaml")


def test_unknown_task_and_duplicate_names(tmp_path):
    v = registry.vertical("clinical")
    with pytest.raises(KitError, match="unknown clinical task 'nope'; available: "):
        v.load_tasks(["nope"], [])
    dup = tmp_path / "dup.yaml"
    dup.write_text(yaml.safe_dump(_with("name", "readmission_30d")))
    with pytest.raises(KitError, match="listed twice"):
        v.load_tasks(["readmission_30d"], [str(dup)])


def test_build_config_errors_name_the_field(tmp_path):
    assert load_config(None, ["tokenizer.max_len=512"]).tokenizer.max_len == 512
    with pytest.raises(KitError, match="unknown field `tokenizer.maxlen`"):
        load_config(None, ["tokenizer.maxlen=512"])
    with pytest.raises(KitError, match="splits"):
        load_config(None, ["splits.train=0.9"])
    with pytest.raises(KitError, match="follow_up.date"):
        load_config(None, ["follow_up.rule=fixed"])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("mixing: {temperature: 0.5}\n")
    with pytest.raises(KitError, match="mixing.temperature"):
        load_config(cfg)


def test_example_build_config_is_the_defaults():
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "clinical-dataset.yaml"
    assert load_config(example) == load_config(None)


def test_vertical_ingests_raw_fhir_through_the_connector(tmp_path):
    """`kit finetune --data raw/fhir` relies on the vertical turning raw records into an event store."""
    from pathlib import Path

    from kit.events import is_event_store, read_subjects

    example = Path(__file__).resolve().parents[1] / "examples" / "data" / "fhir" / "bulk-ndjson"
    out = tmp_path / "events"
    registry.vertical("clinical").ingest([example], out, workers=1)
    assert is_event_store(out) and read_subjects(out).height > 0
