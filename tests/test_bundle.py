"""Bundle trust: every file hashed in MANIFEST.json, verified on load, tampering refused with the file named."""

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from kit import __version__
from kit.bundle import MANIFEST, open_bundle, pack_bundle, write_manifest
from kit.errors import KitError
from kit.eval.bundle_eval import _merged, evaluate_bundle
from kit.eval.calibration import fit_task_calibration
from kit.eval.report import SECTIONS
from kit.eval.scoring import targets_array, task_logits
from kit.train.data import load_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_bundle(tiny_clinical_bundle) -> Path:
    """The session's shared bundle (tests/conftest.py), made by the kit finetune workflow: read it, never change it."""
    return tiny_clinical_bundle


@pytest.fixture(scope="module")
def dataset(tiny_bundle):
    return load_dataset(tiny_bundle.parent / "dataset")


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
            "model_card.md", "report/index.html", "calibration.json"} <= names
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
FILES = ["MANIFEST.json", "calibration.json", "config.json", "lines/base.safetensors", "lines/lines.json", "metrics.json",
         "model.safetensors", "model_card.md", "report/index.html", "report/metrics.json", "report/report.md", "tasks.json",
         "tokenizer.json", "train_config.yaml"]


def test_parametrized_file_list_is_every_file(tiny_bundle):
    scaled = json.loads((tiny_bundle / "lines" / "lines.json").read_text())["finetuned"] != "model.safetensors"
    assert _bundle_files(tiny_bundle) == sorted(FILES + (["lines/finetuned.safetensors"] if scaled else []))


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


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN-safe exact comparison


def test_kit_evaluate_reproduces_the_bundles_test_metrics(tiny_bundle, tmp_path):
    packed = tiny_bundle.parent / "clinical.kitbundle"
    dataset = tiny_bundle.parent / "dataset"
    got = evaluate_bundle(packed, dataset, tmp_path / "eval", n_boot=20)
    want = json.loads((tiny_bundle / "metrics.json").read_text())
    for name, t in want["tasks"].items():
        for key in ("n", "prevalence", "model", "threshold", "subgroups", "uncalibrated"):
            assert _same(got["tasks"][name].get(key), t.get(key)), (name, key)
    assert (tmp_path / "eval" / "metrics.json").is_file() and (tmp_path / "eval" / "report" / "index.html").is_file()
    mortality = got["tasks"]["mortality_1y"]
    assert {"auroc", "auprc", "brier", "ece", "ece_equal_mass", "f1", "sensitivity", "specificity"} <= set(mortality["model"])
    assert sum(v["n"] for v in mortality["subgroups"]["sex"].values()) == mortality["n"]
    assert sum(v["n"] for v in mortality["subgroups"]["age_band"].values()) == mortality["n"]


def test_split_all_scores_every_row_of_another_population(dataset):
    ds = dataset
    n_all = sum(len(split["mortality_1y"].rows) for split in ds.splits.values())
    merged = _merged(load_dataset(ds.root), "all")  # what `kit evaluate --split all` scores
    assert len(merged.splits["all"]["mortality_1y"].rows) == n_all
    assert len(merged.splits["all"]["mortality_1y"].subject_ids) == n_all


def test_kit_evaluate_refuses_a_dataset_with_another_tokenizer(tiny_bundle, tmp_path):
    other = tmp_path / "dataset"
    shutil.copytree(tiny_bundle.parent / "dataset", other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["vocab"] = list(reversed(tok["vocab"]))
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(KitError, match="tokenizer.json differs from the bundle's"):
        evaluate_bundle(tiny_bundle, other, tmp_path / "out", n_boot=5)
    assert not (tmp_path / "out").exists()


def test_temperature_scaling_fixes_a_deliberately_overconfident_model(tiny_bundle, dataset):
    ds, model = dataset, open_bundle(tiny_bundle).load_model()
    task = "next_encounter_type_90d"
    rows = ds.splits["train"][task].rows[:300]
    sharp = type(model)(model.config)
    sharp.load_state_dict(model.state_dict())
    with torch.no_grad():  # a head 8x too sharp: the same ranking, overconfident probabilities
        for p in sharp.task_heads.heads[task].parameters():
            p.mul_(8.0)
    logits = task_logits(sharp, rows, task, torch.device("cpu"), bf16=False).numpy()
    entry = fit_task_calibration("multiclass", logits, targets_array("multiclass", rows))
    assert entry["method"] == "temperature" and entry["temperature"] > 2
    assert entry["val"]["nll_after"] < entry["val"]["nll_before"]


def test_html_report_renders_in_headless_chromium(tiny_bundle, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed")
    page = tiny_bundle / "report" / "index.html"
    html = page.read_text()
    assert "src=\"http" not in html and "<script src" not in html  # self-contained: nothing fetched
    shot = tmp_path / "report.png"
    base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"]
    proc = subprocess.run([*base, f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri()],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and shot.stat().st_size > 20_000, proc.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dom = subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=False).stdout
    for section in SECTIONS:
        assert f'id="{section.lower().replace(" ", "-")}"' in dom and f"<h2>{section}</h2>" in dom, section
    assert dom.count("data:image/png;base64,") >= 3  # reliability diagrams, baseline and LiNeS figures, inline
    assert "LiNeS trade-off" in dom and "held out, probe" in dom


def test_kit_evaluate_on_another_populations_raw_fhir(tiny_bundle, tmp_path):
    """The shipped Bulk Data export (13 patients the bundle never saw) stands in for a second hospital: ingested, built
    with the bundle's tokenizer and classes, every row scored with the bundle's calibration."""
    raw = REPO / "examples" / "data" / "fhir" / "bulk-ndjson"
    got = evaluate_bundle(tiny_bundle, raw, tmp_path / "other", n_boot=5)
    assert got["split"] == "all"
    built = tmp_path / "other.work" / "dataset"
    assert (built / "tokenizer.json").read_bytes() == (tiny_bundle / "tokenizer.json").read_bytes()
    bundle_tasks = json.loads((tiny_bundle / "tasks.json").read_text())["tasks"]
    theirs = json.loads((built / "manifest.json").read_text())["tasks"]
    assert theirs["new_diagnosis_1y"]["classes"] == bundle_tasks["new_diagnosis_1y"]["classes"]
    assert got["tasks"]["mortality_1y"]["n"] > 0 and "ece" in got["tasks"]["mortality_1y"]["model"]
    assert (tmp_path / "other" / "report" / "index.html").is_file()
