"""`kit evaluate --compare OTHER`: this bundle beside another model, per task, for example multitask finetuning
against a `--single-task` run, so the report says whether the task cocktail helped.

OTHER is another bundle or a metrics.json. A bundle with the same tokenizer is scored on exactly the same rows with
its own calibration, and the difference gets a paired subject-level bootstrap interval (both models scored on each
resample): the verdict is "better" only when that interval excludes 0. A metrics.json, or a bundle with another
tokenizer, can only be compared unpaired: its recorded values are shown beside ours, with no test of the difference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from kit.errors import KitError


def training_label(n_tasks: int, names: list[str]) -> str:
    return f"single-task ({names[0]})" if n_tasks == 1 else f"multitask ({n_tasks} tasks)"


def bundle_label(bundle) -> str:
    heads = sorted(bundle.tasks.get("tasks", {}))
    return training_label(len(heads), heads)


def _labels(this: str, other: str) -> tuple[str, str]:
    return (f"{this}: this", f"{other}: other") if this == other else (this, other)


def _primary(ds_manifest: dict, name: str, kind: str) -> str:
    return (ds_manifest["tasks"].get(name) or {}).get("metric") or ("mae" if kind == "regression" else "auroc")


def _verdict(diff: dict, metric: str, this: str, other: str) -> str:
    lo, hi = diff["ci95"]
    if lo is None or hi is None or np.isnan(lo) or np.isnan(hi):
        return "undefined (too few rows or one outcome)"
    higher_better = metric != "mae"
    if lo > 0 or hi < 0:
        this_better = (lo > 0) == higher_better
        return f"{this if this_better else other} better"
    return "no clear difference"


def _summary(tasks: dict[str, dict], this: str, other: str) -> str:
    counts = {"this": 0, "other": 0, "none": 0}
    for t in tasks.values():
        v = t.get("verdict", "")
        counts["this" if v.startswith(this) else "other" if v.startswith(other) else "none"] += 1
    multi_this = this.startswith("multitask") and other.startswith("single-task")
    multi_other = other.startswith("multitask") and this.startswith("single-task")
    if multi_this or multi_other:
        helped, hurt = (counts["this"], counts["other"]) if multi_this else (counts["other"], counts["this"])
        return (f"The task cocktail (multitask finetuning) helped on {helped} task(s), hurt on {hurt}, and made no "
                f"clear difference on {counts['none']} (95% paired interval of the difference excludes 0 or not).")
    return f"{this} better on {counts['this']} task(s), {other} on {counts['other']}, no clear difference on {counts['none']}."


def _scores(model, calibration: dict, task, rows, device, batch_size: int) -> np.ndarray:
    from kit.eval.calibration import apply_task_calibration
    from kit.eval.scoring import task_logits

    logits = task_logits(model, rows, task.name, device, batch_size=batch_size, bf16=False).numpy()
    entry = (calibration.get("tasks") or {}).get(task.name) or {"type": task.type, "method": "none"}
    return apply_task_calibration(entry, logits)


def compare_paired(this_bundle, this_model, other_bundle, ds, split: str, tasks, device, *, n_boot: int, seed: int,
                   batch_size: int = 64) -> dict[str, Any]:
    """Both bundles scored on the same rows of `split`, each with its own calibration."""
    from kit.eval.metrics import bootstrap, metric_fn, paired_difference
    from kit.eval.scoring import targets_array

    this_label, other_label = _labels(bundle_label(this_bundle), bundle_label(other_bundle))
    other_model = other_bundle.load_model().to(device)
    other_heads = {t.name for t in other_model.config.tasks}
    out: dict[str, Any] = {}
    for t in tasks:
        task_rows = ds.splits[split][t.name]
        if t.name not in other_heads or not task_rows.rows:
            continue
        rows = task_rows.rows
        y = targets_array(t.type, rows)
        clusters = np.asarray(task_rows.subject_ids)
        metric = _primary(ds.manifest, t.name, t.type)
        try:
            fn = metric_fn(t.type, metric)
        except KeyError:
            metric = "mae" if t.type == "regression" else "auroc"
            fn = metric_fn(t.type, metric)
        p_this = _scores(this_model, this_bundle.calibration, t, rows, device, batch_size)
        p_other = _scores(other_model, other_bundle.calibration, t, rows, device, batch_size)
        diff = paired_difference(fn, y, p_this, p_other, n_boot=n_boot, seed=seed, clusters=clusters).as_dict()
        out[t.name] = {
            "metric": metric, "n": len(rows), "subjects": int(len(np.unique(clusters))),
            "this": bootstrap(fn, y, p_this, n_boot=n_boot, seed=seed, clusters=clusters).as_dict(),
            "other": bootstrap(fn, y, p_other, n_boot=n_boot, seed=seed, clusters=clusters).as_dict(),
            "difference": diff, "verdict": _verdict(diff, metric, this_label, other_label),
        }
    return {
        "other": str(other_bundle.source), "paired": True, "split": split, "this_label": this_label,
        "other_label": other_label, "tasks": out,
        "note": (f"{this_label} (this bundle) against {other_label} ({other_bundle.source}), both scored on the same "
                 f"{split}-split rows with their own calibration; difference = this minus other, with a paired "
                 f"subject-level bootstrap 95% interval. " + _summary(out, this_label, other_label)),
    }


def _read_metrics(path: Path) -> dict[str, Any]:
    file = path / "metrics.json" if path.is_dir() else path
    if not file.is_file():
        raise KitError(f"--compare {path}: not a bundle, a metrics.json, or a directory holding one")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise KitError(f"--compare {file}: not valid JSON ({err})") from err
    if isinstance(data, dict) and "metrics" in data and "tasks" not in data:
        data = data["metrics"]  # report/metrics.json wraps the metrics
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
        raise KitError(f"--compare {file}: no per-task metrics ('tasks') in it")
    return data


def compare_unpaired(this_label: str, results: dict[str, dict], other: dict[str, Any], source: str,
                     other_label: str | None = None) -> dict[str, Any]:
    """Our metrics beside another model's recorded ones: values and intervals side by side, no test of the difference."""
    names = sorted(other["tasks"])
    this_label, other_label = _labels(this_label, other_label or training_label(len(names), names))
    out: dict[str, Any] = {}
    for name, mine in results.items():
        theirs = other["tasks"].get(name)
        if not theirs or not mine.get("model"):
            continue
        metric = "auroc" if "auroc" in mine["model"] else next(iter(mine["model"]))
        a, b = mine["model"].get(metric), (theirs.get("model") or {}).get(metric)
        if not a or not b:
            continue
        diff = None if a.get("value") is None or b.get("value") is None else float(a["value"]) - float(b["value"])
        (alo, ahi), (blo, bhi) = a.get("ci95") or [None, None], b.get("ci95") or [None, None]
        known = all(isinstance(v, (int, float)) and not np.isnan(v) for v in (alo, ahi, blo, bhi))
        overlap = not (alo > bhi or blo > ahi) if known else None
        out[name] = {"metric": metric, "n": mine.get("n"), "n_other": theirs.get("n"), "this": a, "other": b,
                     "difference": {"value": diff, "ci95": [None, None]},
                     "verdict": "intervals overlap" if overlap else ("intervals apart (unpaired)" if overlap is False else "-")}
    return {
        "other": source, "paired": False, "this_label": this_label, "other_label": other_label, "tasks": out,
        "note": (f"{this_label} (this bundle) beside {other_label} from {source}: unpaired, the other values were "
                 "computed on that model's own rows, so the difference has no interval and is not a test; compare two "
                 "bundles with the same tokenizer for a paired comparison."),
    }


def compare_with(other: Path, this_bundle, this_model, ds, dataset_dir: Path, split: str, tasks, results: dict,
                 device, *, n_boot: int, seed: int, batch_size: int = 64) -> dict[str, Any]:
    """The comparison block for metrics.json['comparison'] (see the module docstring)."""
    from kit.bundle import MANIFEST, open_bundle
    from kit.eval.bundle_eval import check_dataset_matches

    other = Path(other)
    if not other.exists():
        raise KitError(f"--compare {other}: no such file or directory")
    if other.is_dir() and (other / MANIFEST).is_file() or other.is_file() and other.name.endswith(".kitbundle"):
        other_bundle = open_bundle(other)
        if other_bundle.manifest["files"].get("tokenizer.json") == this_bundle.manifest["files"].get("tokenizer.json"):
            check_dataset_matches(other_bundle, dataset_dir)
            return compare_paired(this_bundle, this_model, other_bundle, ds, split, tasks, device, n_boot=n_boot,
                                  seed=seed, batch_size=batch_size)
        return compare_unpaired(bundle_label(this_bundle), results, other_bundle.read_json("metrics.json"), str(other),
                                bundle_label(other_bundle))
    return compare_unpaired(bundle_label(this_bundle), results, _read_metrics(other), str(other))
