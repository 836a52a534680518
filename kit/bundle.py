"""Per-vertical bundles: a directory of safetensors + JSON, and the same packed as one `.kitbundle` (tar.gz).

    bundle/
      MANIFEST.json        format, kit version, vertical, and the SHA-256 and size of every other file
      config.json          model config (backbone, inputs, task heads)
      model.safetensors    weights (safetensors only, never pickle)
      tokenizer.json       the tokenizer fit at dataset build, reused unchanged at prediction time
      tasks.json           task specs, classes, prompts and counts from the dataset manifest
      calibration.json     per-task calibration and decision thresholds (when fit)
      metrics.json         test-split metrics with the baseline beside them
      train_config.yaml    the effective training config
      model_card.md        intended use, data, tasks, metrics, limitations

`open_bundle(path)` accepts the directory or the `.kitbundle`, and refuses anything whose files do not match
MANIFEST.json exactly (changed, truncated, missing or extra files) or that an incompatible kit wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kit import __version__
from kit.errors import KitError
from kit.fsutil import atomic_dir, atomic_file

BUNDLE_FORMAT = "kit-bundle"
FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tasks.json")
BUNDLE_SUFFIX = ".kitbundle"
# Refuse archives that would unpack to more than this (a gzip bomb, or not a bundle at all).
MAX_UNPACKED_BYTES = 8 << 30


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _major(version: str) -> str:
    return str(version).split(".", 1)[0]


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
    extra_texts: dict[str, str] | None = None,
    model_card: str | None = None,
) -> Path:
    """Write the bundle directory atomically; `model` is a KitModel (LoRA already merged).

    `extra_texts` maps bundle-relative names to file contents (calibration.json, report/index.html, ...).
    """
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
        for name, text in (extra_texts or {}).items():
            dest = tmp / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text)
        if model_card is None:
            model_card = default_model_card(vertical, tasks, metrics, train_config_yaml)
        (tmp / "model_card.md").write_text(model_card)
        write_manifest(tmp, vertical=vertical)
    return target


def write_manifest(directory: Path, *, vertical: str) -> dict[str, Any]:
    """(Re)write MANIFEST.json over every file under `directory`."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST)
    manifest = {
        "format": BUNDLE_FORMAT,
        "format_version": FORMAT_VERSION,
        "kit_version": __version__,
        "vertical": vertical,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": {p.relative_to(directory).as_posix(): sha256_file(p) for p in files},
        "sizes": {p.relative_to(directory).as_posix(): p.stat().st_size for p in files},
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def default_model_card(vertical: str, tasks: dict[str, Any], metrics: dict[str, Any], train_config_yaml: str) -> str:
    """A plain model card from what the bundle holds; the report (when present) has the full one."""
    lines = [f"# Model card: kit {vertical} bundle", "",
             f"- kit version: {__version__}",
             f"- backbone: {metrics.get('backbone')} ({metrics.get('size')}), LoRA: {metrics.get('lora')}",
             f"- subjects in the dataset: {metrics.get('subjects')}", "",
             "## Intended use", "",
             (f"Risk estimates for the {vertical} tasks below, as decision support reviewed by a professional; "
             "not a diagnosis and not validated for populations unlike the training data."), "",
             "## Tasks and test-split metrics", "",
             "| task | type | n | metric | value [95% CI] |", "|---|---|---|---|---|"]
    for name, t in (metrics.get("tasks") or {}).items():
        for m, v in (t.get("model") or {}).items():
            lo, hi = v.get("ci95", [None, None])
            lines.append(f"| {name} | {t.get('type')} | {t.get('n')} | {m} | {_num(v.get('value'))} [{_num(lo)}, {_num(hi)}] |")
    lines += ["", "## Limitations", "",
              ("Trained on one population's records; calibration and performance can drift on another population "
              "or a later time span: re-evaluate with `kit evaluate` before use there."), "",
              "## Training config", "", "```yaml", train_config_yaml.rstrip(), "```", ""]
    return "\n".join(lines)


def _num(v: Any) -> str:
    try:
        return f"{float(v):.3f}"
    except (TypeError, ValueError):
        return "n/a"


def pack_bundle(directory: Path, out_file: Path) -> Path:
    """Pack a bundle directory into a `.kitbundle` tar.gz, atomically, with stable member order."""
    directory, out_file = Path(directory), Path(out_file)
    with atomic_file(out_file, "wb") as fh, tarfile.open(fileobj=fh, mode="w:gz") as tar:
        for p in sorted(directory.rglob("*")):
            if p.is_file():
                info = tar.gettarinfo(str(p), arcname=p.relative_to(directory).as_posix())
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                info.mode = 0o644
                with p.open("rb") as src:
                    tar.addfile(info, src)
    return out_file


# ---------------------------------------------------------------- loading and verification


@dataclass
class Bundle:
    """A verified bundle directory (for a `.kitbundle`, its extracted copy)."""

    root: Path
    source: Path
    manifest: dict[str, Any]

    @property
    def vertical(self) -> str:
        return self.manifest.get("vertical", "")

    @property
    def kit_version(self) -> str:
        return self.manifest.get("kit_version", "")

    def path(self, name: str) -> Path:
        return self.root / name

    def has(self, name: str) -> bool:
        return name in self.manifest["files"]

    def read_json(self, name: str, default: Any = None) -> Any:
        if not self.has(name):
            if default is not None:
                return default
            raise KitError(f"{self.source}: the bundle has no {name}")
        return json.loads((self.root / name).read_text())

    @property
    def tasks(self) -> dict[str, Any]:
        return self.read_json("tasks.json")

    @property
    def calibration(self) -> dict[str, Any]:
        return self.read_json("calibration.json", default={})

    def load_model(self):
        from kit.models import KitModel

        return KitModel.from_pretrained(self.root)


def _read_manifest(directory: Path, source: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        raise KitError(f"{source}: {MANIFEST} is missing; not a kit bundle (or a truncated one)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise KitError(f"{source}: {MANIFEST} is not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise KitError(f"{source}: {MANIFEST} has no 'files' table of SHA-256 hashes")
    return manifest


def check_compatible(manifest: dict[str, Any], source: Path) -> None:
    """Refuse a bundle of another format, a newer format version, or another kit major version."""
    fmt = manifest.get("format")
    if fmt != BUNDLE_FORMAT:
        raise KitError(f"{source}: {MANIFEST}: unknown bundle format {fmt!r} (expected {BUNDLE_FORMAT!r})")
    version = manifest.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise KitError(f"{source}: {MANIFEST}: bundle format version {version!r} is newer than this kit reads "
                       f"({FORMAT_VERSION})", hint="upgrade kit")
    theirs = str(manifest.get("kit_version", ""))
    if _major(theirs) != _major(__version__):
        raise KitError(f"{source}: {MANIFEST}: written by kit {theirs or '(unknown)'}, incompatible with kit "
                       f"{__version__} (major version differs)",
                       hint=f"use kit {_major(theirs)}.x to load it, or re-export the bundle")


def verify_directory(directory: Path, source: Path | None = None) -> dict[str, Any]:
    """Check MANIFEST.json against the files: every listed file present with its hash, nothing unlisted.

    Returns the manifest; raises KitError naming the first offending file and why.
    """
    directory = Path(directory)
    source = Path(source or directory)
    manifest = _read_manifest(directory, source)
    check_compatible(manifest, source)
    listed: dict[str, str] = manifest["files"]
    sizes: dict[str, int] = manifest.get("sizes", {})
    for name in REQUIRED_FILES:
        if name not in listed:
            raise KitError(f"{source}: {name} is not listed in {MANIFEST}; the bundle is incomplete")
    for name, digest in sorted(listed.items()):
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise KitError(f"{source}: {MANIFEST} lists an unsafe path {name!r}")
        path = directory / rel
        if path.is_symlink() or not path.is_file():
            raise KitError(f"{source}: {name} is missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if name in sizes and size != sizes[name]:
            raise KitError(f"{source}: {name} is {size} bytes but {MANIFEST} records {sizes[name]} (truncated or changed)")
        actual = sha256_file(path)
        if actual != digest:
            raise KitError(f"{source}: {name} does not match its SHA-256 in {MANIFEST} (the file was changed or corrupted)")
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if p.is_symlink():
            raise KitError(f"{source}: {rel} is a symbolic link; bundles hold plain files only")
        if p.is_file() and rel != MANIFEST and rel not in listed:
            raise KitError(f"{source}: {rel} is not listed in {MANIFEST} (a file was added after the bundle was written)")
    return manifest


def _cache_root() -> Path:
    base = os.environ.get("KIT_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")), "kit")
    return Path(base) / "bundles"


def _safe_extract(archive: Path, target: Path) -> None:
    """Unpack plain files only, refusing absolute paths, `..`, links and devices; a truncated archive is an error."""
    total = 0
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            for member in tar:
                name = member.name
                rel = Path(name)
                if rel.is_absolute() or ".." in rel.parts or name.startswith(("/", "\\")):
                    raise KitError(f"{archive}: member {name!r} points outside the bundle; refusing to extract")
                if member.isdir():
                    continue
                if not member.isfile():
                    raise KitError(f"{archive}: member {name!r} is not a plain file (link or device); refusing to extract")
                total += member.size
                if total > MAX_UNPACKED_BYTES:
                    raise KitError(f"{archive}: unpacks to more than {MAX_UNPACKED_BYTES >> 30} GiB; refusing")
                dest = target / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                assert src is not None
                with src, dest.open("wb") as out:
                    shutil.copyfileobj(src, out)
    except KitError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        raise KitError(f"{archive}: cannot unpack the bundle ({type(err).__name__}: {err}); the file is truncated or not a .kitbundle") from err


def extract_bundle(archive: Path, cache_dir: Path | None = None) -> Path:
    """Unpack a `.kitbundle` into a cache directory keyed by the archive's SHA-256 (reused when already there)."""
    archive = Path(archive)
    digest = sha256_file(archive)
    root = Path(cache_dir) if cache_dir is not None else _cache_root()
    target = root / digest[:32]
    if target.is_dir() and (target / MANIFEST).is_file():
        return target
    try:
        with atomic_dir(target) as tmp:
            _safe_extract(archive, tmp)
    except PermissionError:  # a read-only home: unpack into a private temporary directory instead
        target = Path(tempfile.mkdtemp(prefix="kit-bundle-"))
        _safe_extract(archive, target)
    return target


def open_bundle(path: Path | str, *, cache_dir: Path | None = None) -> Bundle:
    """Open and verify a bundle directory or `.kitbundle`; raises KitError naming the file and reason if it fails."""
    path = Path(path)
    if not path.exists():
        raise KitError(f"{path}: no such bundle (expected a bundle directory or a {BUNDLE_SUFFIX} file)")
    if path.is_dir():
        root = path
    else:
        root = extract_bundle(path, cache_dir)
    # Verified every time, even from the cache: the unpacked copy could have been changed since.
    manifest = verify_directory(root, source=path)
    return Bundle(root=root, source=path, manifest=manifest)


load_bundle = open_bundle

__all__ = [
    "BUNDLE_FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "Bundle",
    "extract_bundle",
    "load_bundle",
    "open_bundle",
    "pack_bundle",
    "sha256_file",
    "verify_directory",
    "write_bundle",
    "write_manifest",
]
