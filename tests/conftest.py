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
