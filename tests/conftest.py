import os
from pathlib import Path

# Pin threads before torch loads: on 2 cores, oversubscribed threads made Mamba steps 10-20x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # kit's data side is usable without torch
    pass

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# Modules that run Mamba on CPU, some through `kit` subprocesses under a timeout.
CPU_SCAN_USERS = {"test_bundle.py", "test_forgetting.py", "test_finetune.py", "test_models.py", "test_kernels.py",
                  "test_kernels_cpu.py"}


def pytest_collection_finish(session):
    """Build the fused CPU scan extension once, before those modules run: with a cold cache, the first
    `impl="auto"` on CPU compiles it (1-2 min), which should not happen inside a subprocess's timeout."""
    if not {Path(str(item.fspath)).name for item in session.items} & CPU_SCAN_USERS:
        return
    try:
        from kit.kernels.dispatch import cpu_extension_available
    except ImportError:  # no torch: nothing to build
        return
    cpu_extension_available()  # a failure is logged once and auto falls back to chunked


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tests_data() -> Path:
    return REPO / "tests" / "data"


@pytest.fixture(scope="session")
def synthea_bundles(shared_data: Path) -> Path:
    return shared_data / "fhir" / "synthea-r4-bundles"


@pytest.fixture(scope="session")
def synthea_events(synthea_bundles: Path, tmp_path_factory) -> Path:
    """The shared Synthea bundles ingested once per session by the real `kit ingest fhir` command."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("synthea") / "events"
    proc = subprocess.run(
        [sys.executable, "-m", "kit", "ingest", "fhir", str(synthea_bundles), "--out", str(out)],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


EXAMPLE_FHIR = REPO / "examples" / "data" / "fhir"
TINY_BUNDLE_TASKS = ["mortality_1y", "next_encounter_type_90d", "new_diagnosis_1y", "readmission_30d"]
TINY_BUNDLE_TRAIN = [
    "device=cpu", "model.size=tiny", "pretrain.steps=2", "pretrain.optim.batch_size=4", "finetune.steps=3",
    "finetune.eval_every=3", "finetune.checkpoint_every=3", "finetune.optim.batch_size=4", "n_bootstrap=20",
    "max_eval_rows=32", "finetune.hold_out_tasks=[readmission_30d]", "lines.enabled=true", "lines.alphas=[0.5,1.0]",
    "lines.betas=[0.0,0.5]",
]


@pytest.fixture(scope="session")
def tiny_clinical_bundle(tmp_path_factory) -> Path:
    """A small trained clinical bundle, built once per session by the real `kit finetune` workflow (in process).

    Trained on the 40 Synthea patients shipped in examples/data/fhir/synthea-bundles (no ../shared/data needed), with
    60/20/20 subject splits (23/9/8 patients, deceased ones in each), sequences cut to 48 tokens, a tiny Mamba,
    2 pretraining and 3 finetuning steps: the
    metrics mean nothing, the files are real (calibration, report, model card, forgetting, MANIFEST hashes).
    Task heads: mortality_1y (binary), next_encounter_type_90d (multiclass), new_diagnosis_1y (multilabel);
    readmission_30d is in the dataset but held out of finetuning (`--hold-out-task`), and a 3-point LiNeS search
    (`--lines`) chose the shipped weights, so the bundle also holds lines/ (base weights) and the trade-off curve.

    Returns the bundle directory `<workdir>/bundle`. Beside it, for tests to read:

        <workdir>/clinical.kitbundle   the same bundle packed (open_bundle(..., cache_dir=tmp_path) to unpack it)
        <workdir>/dataset/             the dataset it was trained and evaluated on (its tokenizer is the bundle's)
        <workdir>/events/              the event store ingested from the example FHIR

    Shared by every test module of the session: never change these files; copy them first (shutil.copytree).
    """
    from kit import registry
    from kit.train.config import load_train_config
    from kit.train.workflow import FinetuneRequest, run_finetune

    workdir = tmp_path_factory.mktemp("tiny-clinical")
    # One parsing process: for 40 small files, spawning a worker pool costs more than it saves.
    registry.vertical("clinical").ingest([EXAMPLE_FHIR / "synthea-bundles"], workdir / "events", workers=1)
    req = FinetuneRequest(
        vertical="clinical",
        data=[workdir / "events"],
        workdir=workdir,
        config=load_train_config(overrides=TINY_BUNDLE_TRAIN),
        # This salt puts deceased patients in every split: mortality_1y has both outcomes in train, val and test.
        dataset_overrides=["tokenizer.max_len=48", f"tasks=[{','.join(TINY_BUNDLE_TASKS)}]", "splits.train=0.6",
                           "splits.val=0.2", "splits.test=0.2", "splits.salt=kit-tests-17"],
    )
    result = run_finetune(req, lambda _msg: None, lambda _label, _total: None)
    return result.bundle_dir


FINANCE_TASKS_DATA = REPO / "tests" / "data" / "finance_tasks"
TINY_FINANCE_TRAIN = [
    "device=cpu", "model.size=tiny", "pretrain.steps=2", "pretrain.optim.batch_size=4", "finetune.steps=3",
    "finetune.eval_every=3", "finetune.checkpoint_every=3", "finetune.optim.batch_size=4", "n_bootstrap=0",
    "max_eval_rows=16",
]
TINY_FINANCE_BUILD = ["tokenizer.max_len=48", "tokenizer.min_count=2"]


@pytest.fixture(scope="session")
def tiny_finance_bundle(tmp_path_factory) -> Path:
    """A small trained finance bundle (all six tasks), built once per session by the real `kit finetune` workflow
    (in process) from tests/data/finance_tasks (AMLSim, UCI, German credit subsets and 299 tweets), with a tiny
    Mamba, 2 pretraining and 3 finetuning steps: the metrics mean nothing, the files are real.

    Returns `<workdir>/bundle`. Beside it: `<workdir>/finance.kitbundle` (packed), `<workdir>/events` (the event
    store), `<workdir>/dataset` and `<workdir>/pretrain/model` (a kit checkpoint, for `--base-model`). Never change
    these files; copy them first.
    """
    from kit import registry
    from kit.train.config import load_train_config
    from kit.train.workflow import FinetuneRequest, run_finetune

    workdir = tmp_path_factory.mktemp("tiny-finance")
    registry.vertical("finance").ingest([FINANCE_TASKS_DATA], workdir / "events")
    req = FinetuneRequest(vertical="finance", data=[workdir / "events"], workdir=workdir,
                          config=load_train_config(overrides=TINY_FINANCE_TRAIN), dataset_overrides=TINY_FINANCE_BUILD)
    result = run_finetune(req, lambda _msg: None, lambda _label, _total: None)
    return result.bundle_dir


class ServeProcess:
    """A real `kit serve` subprocess on a free loopback port: `url` once it listens, `log()` its stderr so far
    (all of it after `stop()`)."""

    def __init__(self, *args: str, timeout: float = 120) -> None:
        import re
        import subprocess
        import sys
        import time

        self.proc = subprocess.Popen([sys.executable, "-m", "kit", "serve", *args, "--port", "0"], stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, "COLUMNS": "200"}, cwd=REPO)
        self.lines: list[str] = []
        port, deadline = None, time.monotonic() + timeout
        while port is None and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise AssertionError("kit serve exited:\n" + "".join(self.lines))
            self.lines.append(line)
            m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            port = int(m.group(1)) if m else None
        if port is None:
            self.stop()
            raise AssertionError("kit serve did not report its port:\n" + "".join(self.lines))
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        if not self.proc.stderr.closed:
            _, rest = self.proc.communicate(timeout=30)
            self.lines.append(rest)

    def log(self) -> str:
        return "".join(self.lines)


@pytest.fixture
def kit_serve():
    """Start real `kit serve` processes: `server = kit_serve("--bundle", str(b))`; each is stopped after the test."""
    started: list[ServeProcess] = []

    def start(*args: str) -> ServeProcess:
        started.append(ServeProcess(*args))
        return started[-1]

    yield start
    for s in started:
        s.stop()
