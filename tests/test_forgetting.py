"""What finetuning cost and whether the task cocktail helped: held-out tasks (--hold-out-task), LiNeS search stored in
the bundle (--lines, kit lines), and multitask versus single-task (kit evaluate --compare), on the session's tiny bundle
(tests/conftest.py: tiny_clinical_bundle, trained with --hold-out-task readmission_30d and a 3-point --lines grid)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kit.bundle import open_bundle, write_manifest
from kit.errors import KitError
from kit.eval.forgetting import probe_scores
from kit.eval.metrics import metric_fn
from kit.eval.scoring import targets_array
from kit.train.config import load_train_config
from kit.train.data import load_dataset
from kit.train.finetune import training_tasks
from kit.train.lines import apply_lines, lines_scale, load_state, model_state

REPO = Path(__file__).resolve().parents[1]
HELD_OUT = "readmission_30d"


def _kit(*args, cache: Path):
    env = {**os.environ, "KIT_CACHE_DIR": str(cache), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "kit", *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300, check=False)


@pytest.fixture(scope="module")
def bundle(tiny_clinical_bundle):
    return open_bundle(tiny_clinical_bundle)


@pytest.fixture(scope="module")
def dataset(tiny_clinical_bundle):
    return load_dataset(tiny_clinical_bundle.parent / "dataset")


def test_held_out_task_gets_no_head_and_a_row_in_the_report(bundle):
    assert HELD_OUT not in bundle.tasks["tasks"]
    assert HELD_OUT not in {t.name for t in bundle.load_model().config.tasks}
    held = bundle.read_json("metrics.json")["forgetting"]["held_out_tasks"][HELD_OUT]
    assert held["metric"] == "auroc" and held["probe"].startswith("logistic regression")
    md = (bundle.root / "report" / "report.md").read_text()
    assert f"{HELD_OUT} AUROC (held out, probe; n={held['n_test']})" in md


def test_held_out_probe_is_the_same_procedure_before_and_after(single_task_bundle, dataset):
    """mortality_1y, held out of the single-task run, is measured by the same probe on the starting weights (before)
    and on the shipped model (after): recomputed here from the bundle's lines/base.safetensors and model."""
    bundle = open_bundle(single_task_bundle)
    held = bundle.read_json("metrics.json")["forgetting"]["held_out_tasks"]["mortality_1y"]
    assert held["n_test"] == len(dataset.splits["test"]["mortality_1y"].rows) > 0
    model = bundle.load_model()
    y = targets_array("binary", dataset.splits["test"]["mortality_1y"].rows)
    after, n_train = probe_scores(model, dataset, "mortality_1y", "binary", torch.device("cpu"), seed=0, bf16=False)
    apply_lines(model, load_state(bundle.path("lines/base.safetensors")), model_state(model), 0.0, 0.0)
    before, _ = probe_scores(model, dataset, "mortality_1y", "binary", torch.device("cpu"), seed=0, bf16=False)
    auroc = metric_fn("binary", "auroc")
    assert (held["before"], held["after"], held["n_train"]) == (auroc(y, before), auroc(y, after), n_train)
    assert 0 < held["before"] < 1 and 0 < held["after"] < 1
    assert held["change"] == pytest.approx(held["after"] - held["before"])
    lo, hi = held["change_ci95"]
    assert lo <= hi


def test_hold_out_and_single_task_mistakes_are_clear_errors(dataset):
    def tasks(*sets):
        return training_tasks(dataset, load_train_config(overrides=list(sets)))

    assert HELD_OUT not in {t.name for t in tasks(f"finetune.hold_out_tasks=[{HELD_OUT}]")}
    with pytest.raises(KitError, match="unknown or unsupervised task"):
        tasks("finetune.hold_out_tasks=[no_such_task]")
    with pytest.raises(KitError, match="both finetuned and held out"):
        tasks("finetune.tasks=[mortality_1y]", "finetune.hold_out_tasks=[mortality_1y]")


def test_lines_choice_is_what_the_bundle_ships(bundle):
    lines = bundle.read_json("metrics.json")["lines"]
    assert {(p["alpha"], p["beta"]) for p in lines["curve"]} == {(0.5, 0.0), (0.5, 0.5), (1.0, 0.0)}
    chosen = lines["curve"][lines["chosen"]]
    meta = bundle.read_json("lines/lines.json")
    assert (meta["alpha"], meta["beta"]) == (chosen["alpha"], chosen["beta"]) == (lines["alpha"], lines["beta"])
    base = load_state(bundle.path("lines/base.safetensors"))
    shipped = model_state(bundle.load_model())
    finetuned = load_state(bundle.path(meta["finetuned"])) if meta["finetuned"] != "model.safetensors" else shipped
    if meta["finetuned"] == "model.safetensors":
        assert (meta["alpha"], meta["beta"]) == (1.0, 0.0)
    expected = lines_scale(base, finetuned, meta["alpha"], meta["beta"])
    assert all(torch.equal(shipped[k], expected[k]) for k in shipped)
    assert not any(k.startswith("task_heads.") for k in base)
    html = (bundle.root / "report" / "index.html").read_text()
    assert "LiNeS trade-off" in html and html.count("data:image/png;base64,") >= 3


def test_kit_lines_rescales_a_packed_bundle_into_a_new_one(tiny_clinical_bundle, tmp_path):
    packed = tiny_clinical_bundle.parent / "clinical.kitbundle"
    out = tmp_path / "relined"
    proc = _kit("lines", "--bundle", str(packed), "--out", str(out), "--set", "lines.alphas=[0.0,1.0]",
                "--set", "lines.betas=[0.0]", "--set", "n_bootstrap=5", cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LiNeS on validation" in proc.stdout and "chosen" in proc.stdout
    new = open_bundle(out.parent / "relined.kitbundle", cache_dir=tmp_path / "cache")  # verified
    curve = {(p["alpha"], p["beta"]): p for p in new.read_json("metrics.json")["lines"]["curve"]}
    assert set(curve) == {(0.0, 0.0), (1.0, 0.0)}
    assert curve[(0.0, 0.0)]["forgetting"] == 0.0  # alpha=beta=0 is exactly the base: no next-event change
    assert new.manifest["files"]["lines/base.safetensors"] == open_bundle(tiny_clinical_bundle).manifest["files"]["lines/base.safetensors"]
    assert "rescaled_from" in new.read_json("metrics.json")


def test_kit_lines_refuses_a_bundle_without_base_weights(tiny_clinical_bundle, tmp_path):
    from kit.train.finish import rescale_bundle

    copy = tmp_path / "nobase"
    shutil.copytree(tiny_clinical_bundle, copy)
    shutil.rmtree(copy / "lines")
    write_manifest(copy, vertical="clinical")
    with pytest.raises(KitError, match="holds no lines/base.safetensors"):
        rescale_bundle(copy, None, None, [], say=lambda _m: None)
    assert not (tmp_path / "nobase-lines").exists()
    with pytest.raises(KitError, match="is the bundle itself"):
        rescale_bundle(tiny_clinical_bundle, None, tiny_clinical_bundle, [], say=lambda _m: None)


@pytest.fixture(scope="module")
def single_task_bundle(tiny_clinical_bundle, tmp_path_factory) -> Path:
    """`kit finetune --single-task next_encounter_type_90d --hold-out-task mortality_1y` on the shared bundle's
    dataset (so the same tokenizer), through the real CLI."""
    tmp = tmp_path_factory.mktemp("single")
    args = ["finetune", "--vertical", "clinical", "--data", str(tiny_clinical_bundle.parent / "dataset"),
            "--workdir", str(tmp / "run"), "--single-task", "next_encounter_type_90d", "--hold-out-task", "mortality_1y"]
    for s in ["device=cpu", "model.size=tiny", "pretrain.steps=0", "finetune.steps=2", "finetune.eval_every=2",
              "finetune.optim.batch_size=4", "n_bootstrap=20", "max_eval_rows=32"]:
        args += ["--set", s]
    proc = _kit(*args, cache=tmp / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out tasks" in proc.stdout and "mortality_1y" in proc.stdout
    return tmp / "run" / "bundle"


def test_multitask_versus_single_task_is_paired_on_the_same_rows(tiny_clinical_bundle, single_task_bundle, tmp_path):
    """What `kit evaluate --compare` does (the CLI prints kit.eval.cli.comparison_table of the same block)."""
    from rich.console import Console

    from kit.eval.bundle_eval import evaluate_bundle
    from kit.eval.cli import comparison_table

    single = json.loads((single_task_bundle / "metrics.json").read_text())
    assert set(single["tasks"]) == {"next_encounter_type_90d"}
    out = tmp_path / "eval"
    got = evaluate_bundle(tiny_clinical_bundle, tiny_clinical_bundle.parent / "dataset", out, n_boot=20,
                          compare=single_task_bundle)
    comparison = got["comparison"]
    assert comparison["paired"] and set(comparison["tasks"]) == {"next_encounter_type_90d"}
    assert (comparison["this_label"], comparison["other_label"]) == ("multitask (3 tasks)", "single-task (next_encounter_type_90d)")
    t = comparison["tasks"]["next_encounter_type_90d"]
    mine = got["tasks"]["next_encounter_type_90d"]["model"]["auroc"]
    assert t["this"]["value"] == mine["value"] and t["n"] == mine["n"]
    if not np.isnan(t["this"]["value"]) and not np.isnan(t["other"]["value"]):
        assert t["difference"]["value"] == pytest.approx(t["this"]["value"] - t["other"]["value"])
        lo, hi = t["difference"]["ci95"]
        assert t["verdict"] == "no clear difference" if lo <= 0 <= hi else t["verdict"].endswith(" better")
    assert "task cocktail" in comparison["note"]
    console = Console(width=200, record=True)
    console.print(comparison_table(comparison))
    assert "multitask (3 tasks) vs single-task (next_encounter_type_90d) (paired, same rows)" in console.export_text()
    html = (out / "report" / "index.html").read_text()
    assert 'id="comparison"' in html and "single-task (next_encounter_type_90d)" in html
    assert "## Comparison" in (out / "report" / "report.md").read_text()


def test_compare_with_a_metrics_file_is_unpaired(tiny_clinical_bundle, single_task_bundle, tmp_path):
    from kit.eval.compare import _read_metrics, compare_unpaired

    mine = json.loads((tiny_clinical_bundle / "metrics.json").read_text())["tasks"]
    c = compare_unpaired("multitask (3 tasks)", mine, _read_metrics(single_task_bundle / "metrics.json"),
                         str(single_task_bundle / "metrics.json"))
    assert not c["paired"] and "unpaired" in c["note"] and c["other_label"] == "single-task (next_encounter_type_90d)"
    t = c["tasks"]["next_encounter_type_90d"]
    assert t["difference"]["ci95"] == [None, None] and t["this"] == mine["next_encounter_type_90d"]["model"]["auroc"]
    assert set(c["tasks"]) == {"next_encounter_type_90d"}  # only the tasks both models have
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(KitError, match="no per-task metrics"):
        _read_metrics(bad)
