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
CPU_SCAN_USERS = {"test_bundle.py", "test_finetune.py", "test_models.py", "test_kernels.py", "test_kernels_cpu.py"}


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
