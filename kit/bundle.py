"""Per-vertical bundles: a directory of safetensors + JSON, and the same packed as one `.kitbundle` (tar.gz).

    bundle/
      MANIFEST.json        kit version, vertical, and the SHA-256 of every other file
      config.json          model config (backbone, inputs, task heads)
      model.safetensors    weights (safetensors only, never pickle)
      tokenizer.json       the tokenizer fit at dataset build, reused unchanged at prediction time
      tasks.json           task specs, classes, prompts and counts from the dataset manifest
      metrics.json         test-split metrics with the baseline beside them
      train_config.yaml    the effective training config
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

from kit import __version__
from kit.fsutil import atomic_dir, atomic_file

BUNDLE_FORMAT = "kit-bundle"
MANIFEST = "MANIFEST.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_bundle(
    target: Path,
    *,
    vertical: str,
    model,
    tokenizer_file: Path,
    tasks: dict[str, Any],
    metrics: dict[str, Any],
    train_config_yaml: str,
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Write the bundle directory atomically; `model` is a KitModel (LoRA already merged)."""
    target = Path(target)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp / "_model")
        for f in (tmp / "_model").iterdir():
            f.rename(tmp / f.name)
        (tmp / "_model").rmdir()
        shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        (tmp / "tasks.json").write_text(json.dumps(tasks, indent=1, default=str))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
        (tmp / "train_config.yaml").write_text(train_config_yaml)
        for name, src in (extra_files or {}).items():
            dest = tmp / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "format": BUNDLE_FORMAT,
            "kit_version": __version__,
            "vertical": vertical,
            "files": {str(p.relative_to(tmp)): sha256_file(p) for p in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return target


def pack_bundle(directory: Path, out_file: Path) -> Path:
    """Pack a bundle directory into a `.kitbundle` tar.gz, atomically, with stable member order."""
    directory, out_file = Path(directory), Path(out_file)
    with atomic_file(out_file, "wb") as fh:
        with tarfile.open(fileobj=fh, mode="w:gz") as tar:
            for p in sorted(directory.rglob("*")):
                if p.is_file():
                    info = tar.gettarinfo(str(p), arcname=str(p.relative_to(directory)))
                    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                    with p.open("rb") as src:
                        tar.addfile(info, src)
    return out_file
