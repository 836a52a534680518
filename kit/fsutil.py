"""Atomic writes: a killed run never leaves a half-written file or directory behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(target: Path | str, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(target)
        # Move the old one aside first so the swap is two renames, never a half-deleted target.
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


@contextlib.contextmanager
def atomic_file(target: Path | str, mode: str = "wb") -> Iterator:
    """Open a temporary sibling file for writing; rename it over `target` when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(target: Path | str, text: str) -> None:
    with atomic_file(target, "w") as fh:
        fh.write(text)


# An ingest writes its pid here inside its temporary directory, so a later run can tell a killed run's leftovers
# from a run still in progress.
OWNER_FILE = ".kit-ingest-pid"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out: Path) -> None:
    """Delete half-built siblings (.DIR.tmp-*) left by an ingest that was killed, so a rerun starts clean."""
    if not out.parent.is_dir():
        return
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        owner = tmp / OWNER_FILE
        try:
            pid = int(owner.read_text())
        except (OSError, ValueError):
            continue  # not ours, or still being created: leave it
        if not pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)
