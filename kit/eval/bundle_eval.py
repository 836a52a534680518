"""`kit evaluate`: score a bundle on a built dataset (its test split, or every row of another population's dataset)
with the bundle's own calibration, and write DIR/metrics.json and DIR/report/."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from kit import __version__
from kit.bundle import Bundle, open_bundle, sha256_file
from kit.errors import KitError
from kit.fsutil import atomic_dir

SPLIT_CHOICES = ("test", "val", "train", "all")


def _merged(ds, split: str):
    """The dataset with one extra split `all` holding every split's rows (another population: all are unseen)."""
    from kit.train.data import TaskRows

    merged = {}
    for name in ds.manifest["tasks"]:
        parts = [ds.splits[s][name] for s in ds.splits]
        merged[name] = TaskRows(
            name=name, type=parts[0].type, num_outputs=parts[0].num_outputs,
            rows=[r for p in parts for r in p.rows],
            subject_ids=np.concatenate([p.subject_ids for p in parts]),
            prediction_times=np.concatenate([p.prediction_times for p in parts]),
        )
    ds.splits[split] = merged
    return ds


def check_dataset_matches(bundle: Bundle, dataset_dir: Path) -> dict[str, Any]:
    """The dataset must be tokenized by the bundle's tokenizer and hold its tasks with the same classes."""
    tok = dataset_dir / "tokenizer.json"
    if not tok.is_file():
        raise KitError(f"{dataset_dir}: no tokenizer.json; not a dataset built by `kit dataset build`")
    if sha256_file(tok) != bundle.manifest["files"]["tokenizer.json"]:
        raise KitError(
            f"{dataset_dir}: its tokenizer.json differs from the bundle's; its token ids mean other codes",
            hint="evaluate on a dataset built alongside this bundle (its workdir's dataset/), built with the bundle's tokenizer",
        )
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    bundle_tasks = bundle.tasks.get("tasks", {})
    for name, spec in bundle_tasks.items():
        theirs = manifest["tasks"].get(name)
        if theirs is None:
            continue
        if theirs.get("classes") != spec.get("classes") or int(theirs["num_outputs"]) != int(spec["num_outputs"]):
            raise KitError(f"{dataset_dir}: task '{name}' has other classes than the bundle's; it cannot be scored by its head")
    return manifest


def dataset_for_population(bundle: Bundle, data: Path, work: Path, say) -> Path:
    """Ingest raw records (unless `data` is already an event store) and build their dataset with the bundle's
    tokenizer and task classes; returns the dataset directory (reused when already built in `work`)."""
    from kit import registry
    from kit.datasets.build import build_dataset
    from kit.datasets.config import load_config
    from kit.events import is_event_store

    vertical = registry.vertical(bundle.vertical)
    if is_event_store(data):
        events = data
    else:
        if not hasattr(vertical, "ingest"):
            raise KitError(f"vertical '{bundle.vertical}' cannot read raw records; ingest them first and pass the event store")
        events = work / "events"
        if not is_event_store(events):
            say(f"ingesting {data} -> {events}")
            vertical.ingest([data], events, show_progress=False)
    meta = bundle.tasks
    tasks = sorted(meta.get("tasks", {}))
    config = load_config(None, [f"tokenizer.max_len={meta.get('max_len') or 512}", f"tasks=[{','.join(tasks)}]"])
    classes = {n: t["classes"] for n, t in meta.get("tasks", {}).items() if t.get("classes")}
    out = work / "dataset"
    say(f"building {events}'s dataset with the bundle's tokenizer -> {out}")
    build_dataset(bundle.vertical, events, out, config, tokenizer_file=bundle.path("tokenizer.json"), task_classes=classes)
    return out


def evaluate_bundle(bundle_path: Path, data: Path, out: Path, *, split: str = "test", n_boot: int = 500, seed: int = 0,
                    batch_size: int = 64, device: str = "auto", say=lambda _t: None,
                    compare: Path | None = None) -> dict[str, Any]:
    """Evaluate a bundle on a dataset; writes out/metrics.json and out/report/ atomically and returns the metrics.

    `compare`: another bundle or metrics.json shown beside this one (kit.eval.compare), e.g. a --single-task run.
    """
    from kit.eval.evaluate import data_summary, evaluate_tasks
    from kit.eval.report import render_report
    from kit.models import TaskSpec
    from kit.train.data import load_dataset
    from kit.train.finetune import resolve_device

    if split not in SPLIT_CHOICES:
        raise KitError(f"--split {split!r}: choose one of {', '.join(SPLIT_CHOICES)}")
    t0 = time.perf_counter()
    bundle = open_bundle(bundle_path)
    say(f"bundle verified: {bundle_path} (kit {bundle.kit_version}, {len(bundle.manifest['files'])} files)")
    data = Path(data)
    if not data.exists():
        raise KitError(f"{data}: no such file or directory")
    if not (data / "manifest.json").is_file():
        # Another population's records: its dataset is built with the bundle's tokenizer and task classes, and
        # every row is scored (none of it was seen in training).
        data = dataset_for_population(bundle, data, Path(str(out) + ".work"), say)
        split = "all" if split == "test" else split
    check_dataset_matches(bundle, data)
    ds = load_dataset(data)
    if split == "all":
        ds = _merged(ds, "all")
    dev = resolve_device(device)
    model = bundle.load_model().to(dev)
    head_names = {t.name for t in model.config.tasks}
    tasks = [TaskSpec(name=n, type=t["type"], num_outputs=int(t["num_outputs"])) for n, t in ds.manifest["tasks"].items()
             if n in head_names]
    if not tasks:
        raise KitError(f"{data}: none of the bundle's tasks ({sorted(head_names)}) are in this dataset")
    say(f"scoring {len(tasks)} task(s) on the {split} split")
    results = evaluate_tasks(model, ds, tasks, dev, split=split, batch_size=batch_size, n_boot=n_boot, seed=seed,
                             bf16=False, calibration=bundle.calibration, baseline=split != "all")
    trained = bundle.read_json("metrics.json", default={})
    metrics = {
        "split": split, "vertical": bundle.vertical, "backbone": trained.get("backbone"), "size": trained.get("size"),
        "lora": trained.get("lora"), "dataset": str(data), "subjects": ds.manifest.get("subjects"), "tasks": results,
        "bundle": str(bundle_path), "bundle_kit_version": bundle.kit_version, "kit_version": __version__,
        "data": data_summary(ds), "forgetting": trained.get("forgetting"),
    }
    if compare is not None:
        from kit.eval.compare import compare_with

        say(f"comparing with {compare}")
        metrics["comparison"] = compare_with(compare, bundle, model, ds, data, split, tasks, results, dev, n_boot=n_boot,
                                             seed=seed, batch_size=batch_size)
    metrics["wall_seconds"] = round(time.perf_counter() - t0, 1)
    with atomic_dir(out) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
        for name, text in render_report(metrics, bundle.calibration, title=f"kit {bundle.vertical} evaluation: {data.name}").items():
            dest = tmp / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text)
    return metrics
