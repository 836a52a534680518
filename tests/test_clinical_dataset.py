"""The clinical prompted multitask dataset on the shared Synthea data, checked against the raw FHIR JSON."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
import polars as pl
import pytest

from kit.datasets.build import build_dataset, read_manifest, scan_rows
from kit.datasets.config import load_config
from kit.datasets.splits import split_of
from kit.events import read_subjects, scan_events
from kit.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
# Small chunks exercise the streaming path; a short max_len exercises left truncation.
ENV = {**os.environ, "COLUMNS": "200"}
OVERRIDES = ["subjects_per_chunk=120", "tokenizer.max_len=256"]


def _utc(s: str) -> datetime:
    if len(s) == 10:  # a date: midnight UTC, the event-store rule for dates without time
        return datetime.fromisoformat(s)
    return datetime.fromisoformat(s.replace("Z", "+00:00")).astimezone(timezone.utc).replace(tzinfo=None)


@pytest.fixture(scope="module")
def raw_facts(synthea_bundles: Path) -> dict:
    """Independent facts read straight from the FHIR JSON with orjson: deaths and encounters per Patient id."""
    deaths: dict[str, datetime | None] = {}
    encounters: dict[str, list[tuple[str, datetime, datetime | None]]] = {}
    for f in sorted(synthea_bundles.glob("*.json.gz")):
        bundle = orjson.loads(gzip.decompress(f.read_bytes()))
        resources = [e["resource"] for e in bundle.get("entry", [])]
        patients = [r for r in resources if r["resourceType"] == "Patient"]
        if not patients:
            continue
        pid = patients[0]["id"]
        deaths[pid] = _utc(patients[0]["deceasedDateTime"]) if "deceasedDateTime" in patients[0] else None
        encounters[pid] = [
            (r["class"]["code"], _utc(r["period"]["start"]), _utc(r["period"]["end"]) if "end" in r["period"] else None)
            for r in resources
            if r["resourceType"] == "Encounter"
        ]
    return {"deaths": deaths, "encounters": encounters}


@pytest.fixture(scope="module")
def dataset(synthea_events: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clinical") / "dataset"
    build_dataset("clinical", synthea_events, out, load_config(None, OVERRIDES))
    return out


@pytest.fixture(scope="module")
def rows(dataset: Path) -> pl.DataFrame:
    return pl.concat([scan_rows(dataset, s).collect() for s in ("train", "val", "test")])


@pytest.fixture(scope="module")
def pid_of(synthea_events: Path) -> dict[int, str]:
    return dict(read_subjects(synthea_events).select("subject_id", "source_subject_id").iter_rows())


def _task(rows: pl.DataFrame, name: str) -> list[tuple]:
    return rows.filter(pl.col("task") == name).select("subject_id", "prediction_time", "label").rows()


def test_deaths_match_raw_fhir(synthea_events, raw_facts, pid_of):
    from verticals.clinical.labelers import FollowUp, subject_facts

    events = scan_events(synthea_events).collect()
    facts = subject_facts(events, read_subjects(synthea_events), FollowUp())
    got = {pid_of[s]: d for s, d in facts.select("subject_id", "death_time").iter_rows()}
    assert got == raw_facts["deaths"]
    assert sum(d is not None for d in got.values()) == 68


def test_readmission_labels_match_raw_fhir(rows, raw_facts, pid_of):
    checked = positives = 0
    for sid, pt, label in _task(rows, "readmission_30d"):
        pid = pid_of[sid]
        stays = [(s, e) for c, s, e in raw_facts["encounters"][pid] if c == "IMP"]
        assert any(e == pt for _, e in stays), "prediction time is an inpatient discharge"
        death = raw_facts["deaths"][pid]
        readmitted = any(pt < s <= pt + timedelta(days=30) and (death is None or s <= death) for s, _ in stays)
        assert label == float(readmitted), (pid, pt)
        checked += 1
        positives += readmitted
    # Every raw stay followed by another within 30 days (patient alive at discharge) is a positive row.
    raw_pos = {
        (pid, e)
        for pid, encs in raw_facts["encounters"].items()
        for c, s0, e in encs
        if c == "IMP" and e is not None and (raw_facts["deaths"][pid] is None or raw_facts["deaths"][pid] > e)
        and any(c2 == "IMP" and e < s <= e + timedelta(days=30) and (raw_facts["deaths"][pid] is None or s <= raw_facts["deaths"][pid])
                for c2, s, _ in encs)
    }
    got_pos = {(pid_of[s], pt) for s, pt, y in _task(rows, "readmission_30d") if y == 1.0}
    assert got_pos == raw_pos
    assert checked > 200 and positives > 20


def test_mortality_labels_match_raw_fhir(rows, raw_facts, pid_of, dataset):
    for task, days in [("mortality_30d_post_discharge", 30), ("mortality_1y", 365)]:
        n_pos = 0
        for sid, pt, label in _task(rows, task):
            death = raw_facts["deaths"][pid_of[sid]]
            assert death is None or death > pt, "no sample after death"
            died = death is not None and death <= pt + timedelta(days=days)
            assert label == float(died), (task, pid_of[sid], pt)
            n_pos += died
        assert n_pos > 0, task
    # 1-year mortality: every encounter start within a year before a recorded death is a positive sample,
    # except those excluded for having no history at all.
    raw_pos = {
        (pid, s)
        for pid, encs in raw_facts["encounters"].items()
        for _, s, _ in encs
        if raw_facts["deaths"][pid] is not None and s < raw_facts["deaths"][pid] <= s + timedelta(days=365)
    }
    got_pos = {(pid_of[s], pt) for s, pt, y in _task(rows, "mortality_1y") if y == 1.0}
    assert got_pos <= raw_pos
    no_history = sum(c["excluded"].get("no_history", 0) for c in read_manifest(dataset)["tasks"]["mortality_1y"]["counts"].values())
    assert len(raw_pos) - len(got_pos) <= no_history


def test_no_input_token_at_or_after_prediction_time(rows):
    assert rows.height > 10_000
    leaked = rows.filter(pl.col("token_time").list.max() >= pl.col("prediction_time"))
    assert leaked.height == 0, leaked.select("task", "subject_id", "prediction_time").head()
    assert rows.filter(pl.col("n_tokens") == 0).height == 0
    assert rows.select((pl.col("input_ids").list.len() == pl.col("n_tokens")).all()).item()
    assert rows.select((pl.col("n_tokens") <= 256).all()).item()
    for col in ("token_time", "token_age", "token_type", "token_visit"):
        assert rows.select((pl.col(col).list.len() == pl.col("n_tokens")).all()).item(), col


def test_history_is_every_token_before_the_prediction_time(rows, dataset, synthea_events):
    """The window is exactly the encoded tokens strictly before the prediction time (left-truncated)."""
    tk = Tokenizer.load(dataset / "tokenizer.json")
    sample = rows.filter(pl.col("task").is_in(["readmission_30d", "mortality_in_hospital"])).head(40)
    sids = sample.get_column("subject_id").unique()
    events = scan_events(synthea_events).filter(pl.col("subject_id").is_in(sids.implode())).collect()
    tokens = tk.encode(events, read_subjects(synthea_events).filter(pl.col("subject_id").is_in(sids.implode())))
    for r in sample.iter_rows(named=True):
        before = tokens.filter((pl.col("subject_id") == r["subject_id"]) & (pl.col("time") < r["prediction_time"]))
        ids = before.get_column("token_id").to_list()
        if len(ids) <= 256:
            assert r["input_ids"] == ids
        else:  # [CLS] + static tokens, then the most recent history
            n_prefix = before.filter(pl.col("type").is_in([1, 2]) & (pl.col("visit") == 0)).head(10).height
            prefix = ids[: min(n_prefix, 128)]
            assert r["input_ids"] == prefix + ids[len(ids) - (256 - len(prefix)) :]
        assert r["input_ids"][0] == tk.token_to_id["[CLS]"]


def test_splits_are_disjoint_and_deterministic(rows, dataset):
    per_subject = rows.group_by("subject_id").agg(pl.col("split").n_unique().alias("n"), pl.col("split").first())
    assert per_subject.get_column("n").max() == 1
    cfg = load_config(None, OVERRIDES)
    for sid, split in per_subject.select("subject_id", "split").iter_rows():
        assert split == split_of(sid, cfg.splits)
    assert set(rows.get_column("split").unique()) == {"train", "val", "test"}


def test_same_input_same_bytes(dataset, synthea_events, tmp_path):
    again = tmp_path / "again"
    build_dataset("clinical", synthea_events, again, load_config(None, OVERRIDES))
    first = sorted(p.relative_to(dataset) for p in dataset.rglob("*") if p.is_file())
    second = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert first == second
    for rel in first:
        assert (dataset / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_manifest_counts_and_prompts(dataset, rows):
    m = read_manifest(dataset)
    expected = {
        "mortality_in_hospital", "mortality_30d_post_discharge", "mortality_1y", "readmission_30d", "long_los",
        "next_encounter_type_90d", "new_diagnosis_1y", "forecast_next_events",
    }
    assert set(m["tasks"]) == expected
    tk = Tokenizer.load(dataset / "tokenizer.json")
    assert m["vocab_size"] == tk.vocab_size
    assert abs(sum(m["mixing"]["weights"].values()) - 1) < 1e-9
    for name, t in m["tasks"].items():
        sub = rows.filter(pl.col("task") == name)
        for split, c in t["counts"].items():
            assert sub.filter(pl.col("split") == split).height == c["samples"], (name, split)
            assert c["cohort"] == c["samples"] + c["censored"] + sum(c["excluded"].values())
            if t["type"] == "binary":
                assert int(sub.filter(pl.col("split") == split).get_column("label").sum()) == c["positives"]
        assert tk.vocab[t["task_token_id"]] == f"[TASK:{name}]"
        assert sub.get_column("task_token_id").unique().to_list() == [t["task_token_id"]]
        assert sub.get_column("prompt").unique().to_list() == [t["prompt"]]
    # The censoring rule is in force: follow-up ending early removes samples.
    assert sum(c["censored"] for c in m["tasks"]["mortality_1y"]["counts"].values()) > 0
    nd = m["tasks"]["new_diagnosis_1y"]
    assert len(nd["classes"]) == 8
    lab = rows.filter(pl.col("task") == "new_diagnosis_1y")
    assert lab.select((pl.col("labels").list.len() == 8).all()).item()
    # A condition diagnosed before the prediction time is masked, never a positive.
    assert lab.select(((pl.col("labels").list.get(0) == 1) & (pl.col("label_mask").list.get(0) == 0)).any()).item() is False
    fc = rows.filter(pl.col("task") == "forecast_next_events")
    assert fc.select((pl.col("target_ids").list.len() > 0).all()).item()


def test_new_diagnosis_classes_come_from_the_train_split(dataset, synthea_events):
    from verticals.clinical.labelers import choose_condition_codes
    from verticals.clinical.spec import NewConditionRule

    m = read_manifest(dataset)
    spec = m["tasks"]["new_diagnosis_1y"]["spec"]["label"]
    cfg = load_config(None, OVERRIDES)
    subjects = read_subjects(synthea_events).get_column("subject_id").to_list()
    train = [s for s in subjects if split_of(s, cfg.splits) == "train"]
    events = scan_events(synthea_events)
    on_train = choose_condition_codes(events.filter(pl.col("subject_id").is_in(train)), NewConditionRule(**spec))
    assert on_train.get_column("code").to_list() == m["tasks"]["new_diagnosis_1y"]["classes"]


def test_cli_build_show_and_tiny_cohort_warning(synthea_events, tmp_path):
    spec = tmp_path / "centenarian_readmission.yaml"
    spec.write_text(
        "name: centenarian_readmission\ndescription: readmission of patients over 130\ntype: binary\n"
        "cohort: {encounter_classes: [INPATIENT], require_end: true, min_age_years: 130}\n"
        "prediction_time: {at: encounter_end}\nhorizon: {days: 30}\n"
        "label: {rule: encounter, classes: [INPATIENT]}\nprompt: Readmitted within 30 days?\n"
    )
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "kit", "dataset", "build", "--vertical", "clinical", "--events", str(synthea_events),
           "--out", str(out), "--tasks", "readmission_30d", "--task-file", str(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning" in proc.stdout and "centenarian_readmission: only 0 samples" in proc.stdout
    assert "excluded" in proc.stdout  # the numbers come with the warning
    m = read_manifest(out)
    assert m["tasks"]["centenarian_readmission"]["counts"]["train"]["excluded"]["age"] > 0
    show = subprocess.run([sys.executable, "-m", "kit", "dataset", "show", str(out)], capture_output=True, text=True,
                          cwd=REPO, env=ENV)
    assert show.returncode == 0 and "readmission_30d" in show.stdout
    sid = read_subjects(synthea_events).item(0, "source_subject_id")
    tok = subprocess.run([sys.executable, "-m", "kit", "tokenize", "--show", sid, "--dataset", str(out), "--limit", "5"],
                         capture_output=True, text=True, cwd=REPO, env=ENV)
    assert tok.returncode == 0 and "[VE]" in tok.stdout
    bad = subprocess.run(cmd[:-2] + ["--set", "splits.train=0.5"], capture_output=True, text=True, cwd=REPO,
                         env=ENV)
    assert bad.returncode == 2 and "splits" in bad.stderr and "Traceback" not in bad.stderr


def test_is_up_to_date_tracks_config_and_events(dataset, synthea_events):
    from kit.datasets.build import is_up_to_date

    assert is_up_to_date(dataset, synthea_events, "clinical", load_config(None, OVERRIDES))
    assert not is_up_to_date(dataset, synthea_events, "clinical", load_config(None, OVERRIDES + ["mixing.temperature=3"]))
    assert not is_up_to_date(dataset.parent / "nothing-here", synthea_events, "clinical", load_config(None, OVERRIDES))


def test_subjects_without_a_patient_record_are_left_out_and_counted(synthea_events, tmp_path):
    import shutil

    store = tmp_path / "events"
    shutil.copytree(synthea_events, store)
    subjects = read_subjects(store)
    dropped = subjects.item(0, "subject_id")
    subjects.slice(1).write_parquet(store / "metadata" / "subjects.parquet")
    cfg = load_config(None, ["tasks=[mortality_1y]"])
    m = build_dataset("clinical", store, tmp_path / "ds", cfg)
    assert m["subjects_left_out"] == {"no_subject_record": 1}
    assert sum(m["subjects"].values()) == subjects.height - 1
    got = pl.concat([scan_rows(tmp_path / "ds", s).collect() for s in ("train", "val", "test")])
    assert dropped not in got.get_column("subject_id").to_list() and got.height > 1000


def test_next_encounter_type_matches_raw_fhir(rows, raw_facts, pid_of, synthea_bundles):
    # Raw class codes to the task's groups (inpatient, emergency, ambulatory; 3 = none); urgent care (an AMB
    # encounter typed 702927004) is emergency, but the shared data has none, which the event store confirms.
    group = {"IMP": 0, "EMER": 1, "AMB": 2}
    checked = 0
    for sid, pt, label in _task(rows, "next_encounter_type_90d"):
        pid = pid_of[sid]
        death = raw_facts["deaths"][pid]
        nxt = [
            (s, group[c]) for c, s, _ in raw_facts["encounters"][pid]
            if pt < s <= pt + timedelta(days=90) and (death is None or s <= death)
        ]
        if nxt:
            first = min(s for s, _ in nxt)
            expected = min(g for s, g in nxt if s == first)  # a tie goes to the group listed first
        else:
            expected = 3
        assert label == expected, (pid, pt)
        checked += 1
    assert checked > 1000
    counts = rows.filter(pl.col("task") == "next_encounter_type_90d").group_by("label").len()
    assert counts.height == 4  # every class occurs


def test_refuses_foreign_directory_and_interrupted_build_leaves_nothing(synthea_events, tmp_path, dataset):
    from kit.errors import KitError

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(KitError, match="not a dataset written by `kit dataset build`"):
        build_dataset("clinical", synthea_events, foreign, load_config(None, ["tasks=[readmission_30d]"]))
    assert (foreign / "notes.txt").read_text() == "keep me"

    def stop(done, total):
        raise KeyboardInterrupt

    out = tmp_path / "ds"
    with pytest.raises(KeyboardInterrupt):
        build_dataset("clinical", synthea_events, out, load_config(None, ["tasks=[readmission_30d]"]), on_chunk=stop)
    assert not out.exists() and list(tmp_path.iterdir()) == [foreign]


def test_text_form_of_a_row(rows, dataset, synthea_events):
    from kit.datasets.text import history_text
    from kit.events import read_codes

    tk = Tokenizer.load(dataset / "tokenizer.json")
    describe = dict(read_codes(synthea_events).select("code", "description").iter_rows())
    row = rows.filter(pl.col("task") == "readmission_30d").sort("n_tokens").row(-1, named=True)
    text = history_text(row["input_ids"], row["token_time"], row["token_age"], row["token_type"], row["prompt"], tk, describe)
    lines = text.splitlines()
    assert lines[0].startswith("History") and lines[-1] == f"Question: {row['prompt']}"
    n_visits = sum(1 for t in row["input_ids"] if t == tk.token_to_id["[VS]"])
    assert n_visits <= len(lines) - 2 <= n_visits + 2  # one line per visit, plus what lies outside visits
    assert "(bin " in text and "visit (INPATIENT)" in text


def test_regression_spec_length_of_stay_in_days(synthea_events, raw_facts, pid_of, tmp_path):
    spec = tmp_path / "los_days.yaml"
    spec.write_text(
        "name: los_days\ndescription: length of an inpatient stay in days\ntype: regression\nmetric: mae\n"
        "cohort: {encounter_classes: [INPATIENT], require_end: true}\n"
        "prediction_time: {at: encounter_start, offset_hours: 12}\nlabel: {rule: length_of_stay}\n"
        "prompt: How many days will this stay last?\n"
    )
    m = build_dataset("clinical", synthea_events, tmp_path / "ds", load_config(None, [f"task_files=[{spec}]"]))
    assert list(m["tasks"]) == ["los_days"] and m["tasks"]["los_days"]["num_outputs"] == 1
    got = pl.concat([scan_rows(tmp_path / "ds", s).collect() for s in ("train", "val", "test")])
    assert got.height > 100
    for sid, pt, label in got.select("subject_id", "prediction_time", "label").rows():
        stays = [(s, e) for c, s, e in raw_facts["encounters"][pid_of[sid]] if c == "IMP" and s + timedelta(hours=12) == pt]
        assert stays and any(abs(label - (e - s).total_seconds() / 86400) < 1e-4 for s, e in stays)
