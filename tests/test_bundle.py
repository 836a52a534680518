"""Bundle trust: every file hashed in MANIFEST.json, verified on load, tampering refused with the file named."""

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from kit import __version__
from kit.bundle import MANIFEST, open_bundle, pack_bundle, write_bundle, write_manifest
from kit.datasets.build import build_dataset
from kit.datasets.config import load_config
from kit.errors import KitError
from kit.train.config import load_train_config
from kit.train.data import load_dataset
from kit.train.finetune import finetune
from kit.train.workflow import train_config_yaml

REPO = Path(__file__).resolve().parents[1]
TASKS = "mortality_1y,next_encounter_type_90d,new_diagnosis_1y"
FAST = ["pretrain.steps=0", "finetune.steps=3", "finetune.eval_every=3", "finetune.optim.batch_size=4",
        "n_bootstrap=20", "model.size=tiny", "max_eval_rows=32"]


@pytest.fixture(scope="module")
def tiny_bundle(synthea_events, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bundle")
    cfg = load_config(None, ["tokenizer.max_len=48", f"tasks=[{TASKS}]"])
    build_dataset("clinical", synthea_events, root / "dataset", cfg)
    ds = load_dataset(root / "dataset")
    tcfg = load_train_config(overrides=FAST)
    model = finetune(ds, tcfg, root / "ft")
    tasks = {"tasks": ds.manifest["tasks"], "max_len": ds.manifest.get("max_len"), "vocab_size": ds.vocab_size}
    out = write_bundle(root / "bundle", vertical="clinical", model=model, tokenizer_file=root / "dataset" / "tokenizer.json",
                       tasks=tasks, metrics={"tasks": {}}, train_config_yaml=train_config_yaml(tcfg),
                       extra_texts={"report/index.html": "<html><body>report</body></html>"})
    pack_bundle(out, root / "clinical.kitbundle")
    return out


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(bundle, dest)
    return dest


def _kit(*args, env_cache: Path):
    import os

    env = {**os.environ, "KIT_CACHE_DIR": str(env_cache), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "kit", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300, check=False)


def test_bundle_holds_every_part_and_opens_as_dir_and_packed(tiny_bundle, tmp_path):
    names = set(json.loads((tiny_bundle / MANIFEST).read_text())["files"])
    assert {"model.safetensors", "config.json", "tokenizer.json", "tasks.json", "metrics.json", "train_config.yaml",
            "model_card.md", "report/index.html"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    a = open_bundle(tiny_bundle)
    b = open_bundle(tiny_bundle.parent / "clinical.kitbundle", cache_dir=tmp_path / "cache")
    assert a.manifest == b.manifest and a.kit_version == __version__
    assert b.root != tiny_bundle and (b.root / "model.safetensors").read_bytes() == (tiny_bundle / "model.safetensors").read_bytes()
    model = b.load_model()
    assert "mortality_1y" in {t.name for t in model.config.tasks}


def _bundle_files(bundle_dir: Path) -> list[str]:
    return sorted(p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*") if p.is_file())


# Parametrized over the files a bundle of this kit writes; the test checks the list is complete.
FILES = ["MANIFEST.json", "config.json", "metrics.json", "model.safetensors", "model_card.md", "report/index.html",
         "tasks.json", "tokenizer.json", "train_config.yaml"]


def test_parametrized_file_list_is_every_file(tiny_bundle):
    assert _bundle_files(tiny_bundle) == sorted(FILES)


@pytest.mark.parametrize("name", FILES)
def test_one_flipped_byte_in_any_file_fails_verification(tiny_bundle, tmp_path, name):
    bundle = _copy(tiny_bundle, tmp_path)
    path = bundle / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the hash can catch it
    path.write_bytes(bytes(data))
    with pytest.raises(KitError) as err:
        open_bundle(bundle)
    msg = str(err.value)
    if name == MANIFEST:
        assert MANIFEST in msg  # a changed manifest no longer matches the files (or no longer parses)
    else:
        assert name in msg and "SHA-256" in msg


def test_flipped_byte_inside_packed_bundle_fails(tiny_bundle, tmp_path):
    bundle = _copy(tiny_bundle, tmp_path)
    w = bundle / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    packed = pack_bundle(bundle, tmp_path / "tampered.kitbundle")
    with pytest.raises(KitError, match=r"model\.safetensors does not match its SHA-256"):
        open_bundle(packed, cache_dir=tmp_path / "cache")


def test_truncated_kitbundle_is_refused(tiny_bundle, tmp_path):
    packed = tiny_bundle.parent / "clinical.kitbundle"
    data = packed.read_bytes()
    for cut in (len(data) // 3, len(data) - 100):
        bad = tmp_path / f"cut{cut}.kitbundle"
        bad.write_bytes(data[:cut])
        with pytest.raises(KitError, match=rf"cut{cut}\.kitbundle: .*(truncated|missing)"):
            open_bundle(bad, cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("*/MANIFEST.json"))  # nothing half-unpacked left to reuse


def test_missing_and_unlisted_files_are_refused(tiny_bundle, tmp_path):
    bundle = _copy(tiny_bundle, tmp_path)
    (bundle / "tokenizer.json").unlink()
    with pytest.raises(KitError, match=r"tokenizer\.json is missing"):
        open_bundle(bundle)
    bundle2 = _copy(tiny_bundle, tmp_path / "b")
    (bundle2 / "extra.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(KitError, match=r"extra\.bin is not listed"):
        open_bundle(bundle2)


def test_wrong_major_version_and_unknown_format_are_refused(tiny_bundle, tmp_path):
    bundle = _copy(tiny_bundle, tmp_path)
    manifest = json.loads((bundle / MANIFEST).read_text())
    major = int(__version__.split(".")[0])
    (bundle / MANIFEST).write_text(json.dumps({**manifest, "kit_version": f"{major + 1}.0.0"}))
    with pytest.raises(KitError, match=rf"written by kit {major + 1}\.0\.0, incompatible"):
        open_bundle(bundle)
    (bundle / MANIFEST).write_text(json.dumps({**manifest, "format": "something-else"}))
    with pytest.raises(KitError, match="unknown bundle format 'something-else'"):
        open_bundle(bundle)


def test_path_traversal_in_archive_is_refused(tmp_path):
    evil = tmp_path / "evil.kitbundle"
    payload = tmp_path / "p.txt"
    payload.write_text("x")
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(payload, arcname="../../escaped.txt")
    with pytest.raises(KitError, match="points outside the bundle"):
        open_bundle(evil, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path.parent / "escaped.txt").exists()


def test_rewritten_manifest_is_valid(tiny_bundle, tmp_path):
    bundle = _copy(tiny_bundle, tmp_path)
    (bundle / "notes.txt").write_text("added by the owner")
    write_manifest(bundle, vertical="clinical")  # re-signing after a deliberate change makes it valid again
    assert "notes.txt" in open_bundle(bundle).manifest["files"]


def test_bundle_verify_and_info_commands(tiny_bundle, tmp_path):
    packed = tiny_bundle.parent / "clinical.kitbundle"
    ok = _kit("bundle", "verify", str(packed), env_cache=tmp_path / "cache")
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout and "model.safetensors" in ok.stdout
    info = _kit("bundle", "info", str(tiny_bundle), env_cache=tmp_path / "cache")
    assert info.returncode == 0, info.stderr
    assert "mortality_1y" in info.stdout and __version__ in info.stdout
    bundle = _copy(tiny_bundle, tmp_path)
    (bundle / "tasks.json").write_text("{}")
    bad = _kit("bundle", "verify", str(bundle), env_cache=tmp_path / "cache")
    assert bad.returncode == 2 and "tasks.json" in bad.stderr and "Traceback" not in bad.stderr
