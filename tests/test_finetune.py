"""`kit finetune` end to end on real Synthea data: stages, reuse, exact resume, and failure messages."""

import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kit.datasets.build import build_dataset
from kit.datasets.config import load_config
from kit.errors import KitError
from kit.train.config import load_train_config
from kit.train.data import load_dataset
from kit.train.finetune import finetune

REPO = Path(__file__).resolve().parents[1]
TASKS = "mortality_1y,readmission_30d,next_encounter_type_90d,new_diagnosis_1y,forecast_next_events"
FAST = ["pretrain.steps=4", "finetune.steps=6", "finetune.eval_every=3", "finetune.checkpoint_every=2",
        "pretrain.optim.batch_size=4", "finetune.optim.batch_size=4", "n_bootstrap=20", "model.size=tiny",
        "max_eval_rows=32"]


@pytest.fixture(scope="module")
def small_dataset(synthea_events, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ft") / "dataset"
    cfg = load_config(None, ["tokenizer.max_len=48", f"tasks=[{TASKS}]"])
    build_dataset("clinical", synthea_events, out, cfg)
    return out


def _kit(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "kit", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_resume_after_kill_ends_with_the_same_weights(small_dataset, tmp_path):
    ds = load_dataset(small_dataset)
    cfg = load_train_config(overrides=FAST)
    full = finetune(ds, cfg, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):  # killed after step 5; the last checkpoint is step 4
        finetune(ds, cfg, tmp_path / "killed", stop_at=5)
    assert (tmp_path / "killed" / "checkpoints" / "step-00000004").is_dir()
    resumed = finetune(ds, cfg, tmp_path / "killed")
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 5, 6]  # step 5 was redone after the kill


def test_finetune_cli_writes_bundle_and_reuses_stages(small_dataset, tmp_path):
    wd = tmp_path / "run"
    args = ["finetune", "--vertical", "clinical", "--data", str(small_dataset), "--workdir", str(wd)]
    for s in FAST:
        args += ["--set", s]
    proc = _kit(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((wd / "bundle" / "metrics.json").read_text())
    manifest = json.loads((small_dataset / "manifest.json").read_text())
    supervised = {n for n, t in manifest["tasks"].items() if t["type"] != "forecast"}
    assert set(metrics["tasks"]) == supervised
    for name, t in metrics["tasks"].items():
        if t["n"]:
            assert "auroc" in t["model"] and "baseline" in t, name
    bundle_manifest = json.loads((wd / "bundle" / "MANIFEST.json").read_text())
    assert {"model.safetensors", "config.json", "tokenizer.json", "tasks.json", "metrics.json"} <= set(bundle_manifest["files"])
    with tarfile.open(wd / "clinical.kitbundle") as tar:
        assert "MANIFEST.json" in tar.getnames()
    assert "mortality_1y" in proc.stdout and "baseline" in proc.stdout and "AUROC" in proc.stdout
    weights = load_file(str(wd / "bundle" / "model.safetensors"))

    again = _kit(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "pretrain: reusing" in again.stdout and "finetune: reusing" in again.stdout
    for k, v in load_file(str(wd / "bundle" / "model.safetensors")).items():
        assert torch.equal(v, weights[k]), k


def test_fixed_seed_gives_identical_models(small_dataset, tmp_path):
    ds = load_dataset(small_dataset)
    cfg = load_train_config(overrides=FAST + ["finetune.steps=2", "finetune.eval_every=2"])
    a = finetune(ds, cfg, tmp_path / "a").state_dict()
    b = finetune(ds, cfg, tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_with_the_batch_named(small_dataset, tmp_path):
    ds = load_dataset(small_dataset)
    cfg = load_train_config(overrides=FAST + ["finetune.task_weights={mortality_1y: .inf, readmission_30d: .inf}"])
    with pytest.raises(KitError, match=r"loss is (nan|inf) at step \d+"):
        finetune(ds, cfg, tmp_path / "nan")


def test_lora_finetune_trains_only_adapters_and_heads(small_dataset, tmp_path):
    ds = load_dataset(small_dataset)
    cfg = load_train_config(overrides=FAST + ["finetune.steps=2", "finetune.eval_every=2", "lora.enabled=true"])
    torch.manual_seed(0)
    model = finetune(ds, cfg, tmp_path / "lora")
    assert not any("lora_" in k for k in model.state_dict())  # merged back into plain weights


@pytest.mark.parametrize(
    "args, message",
    [
        (["--vertical", "nope", "--data", "x"], "unknown vertical 'nope'; available: clinical"),
        (["--vertical", "clinical", "--data", "/no/such/dir"], "/no/such/dir: no such file or directory"),
        (["--vertical", "clinical", "--data", "x", "--resume"], "--resume needs the --workdir"),
        (["--vertical", "clinical", "--data", "x", "--set", "finetune.stepz=3"], "unknown field `finetune.stepz`"),
    ],
)
def test_cli_errors_are_messages_not_tracebacks(args, message, tmp_path):
    proc = _kit("finetune", *args, cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_killed_cli_run_needs_resume_then_finishes(small_dataset, tmp_path):
    """A real kill (SIGKILL) mid-finetune: rerunning refuses without --resume, continues with it."""
    wd = tmp_path / "run"
    args = ["finetune", "--vertical", "clinical", "--data", str(small_dataset), "--workdir", str(wd)]
    for s in FAST + ["pretrain.steps=0", "finetune.steps=8", "finetune.checkpoint_every=1"]:
        args += ["--set", s]
    proc = subprocess.Popen([sys.executable, "-m", "kit", *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = wd / "finetune" / "checkpoints" / "step-00000002"
    deadline = time.monotonic() + 400
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert target.exists(), "the run never reached its second checkpoint"
    refused = _kit(*args)
    assert refused.returncode == 2 and "unfinished run" in refused.stderr and "--resume" in refused.stderr
    resumed = _kit(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (wd / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 8 and (wd / "clinical.kitbundle").exists()


def test_changed_config_rebuilds_the_stage_instead_of_resuming(small_dataset, tmp_path):
    wd = tmp_path / "run"
    base = ["finetune", "--vertical", "clinical", "--data", str(small_dataset), "--workdir", str(wd)]
    for s in FAST + ["pretrain.steps=0", "finetune.steps=2", "finetune.eval_every=2"]:
        base += ["--set", s]
    assert _kit(*base).returncode == 0
    changed = _kit(*base, "--set", "finetune.optim.lr=0.0005")
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert "finetune: reusing" not in changed.stdout


def test_config_show_and_schema():
    shown = _kit("config", "show", "--set", "finetune.steps=7")
    assert shown.returncode == 0 and "steps: 7" in shown.stdout
    schema = json.loads(_kit("config", "schema").stdout)
    assert "finetune" in schema["properties"]


def test_torchrun_two_cpu_processes_on_gloo(small_dataset, tmp_path):
    wd = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "kit", "finetune", "--vertical", "clinical", "--data", str(small_dataset), "--workdir", str(wd)]
    for s in FAST + ["pretrain.steps=2", "finetune.steps=2", "finetune.eval_every=2"]:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (wd / "clinical.kitbundle").exists()
    log = [json.loads(line) for line in (wd / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]  # one writer: rank 0
    assert proc.stdout.count("evaluating on the test split") == 1
