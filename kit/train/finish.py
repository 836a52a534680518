"""After finetuning: LiNeS scaling (with --lines), calibration, test metrics, forgetting, the report and the bundle.

`kit finetune` and `kit lines` both end here, so a bundle is the same whichever command wrote it.

With `lines.store_base` (the default) the bundle also keeps what a later `kit lines --bundle B` needs to rescale:

    lines/base.safetensors        the weights finetuning started from (not the new task heads): ~1x the model
    lines/finetuned.safetensors   the unscaled finetuned weights, only when the chosen LiNeS point is not (1, 0)
    lines/lines.json              the chosen alpha/beta and which file holds the unscaled finetuned weights
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kit.errors import KitError

LINES_BASE = "lines/base.safetensors"
LINES_FINETUNED = "lines/finetuned.safetensors"
LINES_JSON = "lines/lines.json"


@dataclass
class Finished:
    bundle_dir: Path
    bundle_file: Path
    metrics: dict[str, Any]


def finish_bundle(
    *,
    vertical: str,
    model,
    ds,
    dataset_dir: Path,
    cfg,
    start: dict | None,
    pretrained: bool,
    target_dir: Path,
    packed: Path,
    work: Path,
    info: dict[str, Any],
    t0: float,
    say: Callable[[str], None],
    finetuned: dict | None = None,
    train_config_text: str | None = None,
) -> Finished:
    """Evaluate a finetuned `model` and write its bundle.

    `start` is the state finetuning started from (needed by --lines, by --hold-out-task and for the bundle's
    lines/ files), `pretrained` whether that start was a pretrained model (next-event forgetting is measured only then),
    `finetuned` the unscaled finetuned weights when `model` holds something else (default: the model's own).
    """
    from kit import __version__
    from kit.bundle import pack_bundle, write_bundle
    from kit.eval.evaluate import data_summary, evaluate_tasks, fit_calibration
    from kit.eval.forgetting import measure_forgetting, measure_held_out
    from kit.eval.report import render_report
    from kit.train.finetune import resolve_device
    from kit.train.lines import apply_lines, model_state, save_state, search_lines
    from kit.train.workflow import train_config_yaml

    device = resolve_device(cfg.device)
    model = model.to(device)
    tasks = list(model.config.tasks)
    ft_state = finetuned if finetuned is not None else model_state(model)
    lines = None
    if cfg.lines.enabled:
        if start is None:
            raise KitError("--lines needs the weights finetuning started from, and this run has none recorded",
                           hint="rerun the finetune stage with this kit (it records finetune/initial.safetensors)")
        say("LiNeS: scaling the finetuning update over the alpha/beta grid, scored on the validation split")
        lines = search_lines(model, start, ft_state, ds, tasks, device, cfg)
        say(f"LiNeS: chose alpha={lines['alpha']:g}, beta={lines['beta']:g} ({lines['rule']})")
    say("evaluating on the test split beside the count-feature baseline")
    cc = cfg.calibration
    calibration = fit_calibration(model, ds, tasks, device, method=cc.method, threshold_rule=cc.threshold,
                                  target_sensitivity=cc.target_sensitivity, batch_size=cfg.eval_batch_size, bf16=cfg.bf16)
    results = evaluate_tasks(model, ds, tasks, device, split="test", batch_size=cfg.eval_batch_size,
                             n_boot=cfg.n_bootstrap, seed=cfg.seed, bf16=cfg.bf16, calibration=calibration)
    before = None
    if start is not None:
        before = copy.deepcopy(model)
        apply_lines(before, start, ft_state, 0.0, 0.0)  # exactly the starting weights (heads aside)
    forgetting = measure_forgetting(before if pretrained else None, model, ds, device, max_rows=cfg.max_eval_rows,
                                    seed=cfg.seed, bf16=cfg.bf16)
    held = list(cfg.finetune.hold_out_tasks)
    if held:
        if before is None:
            forgetting["held_out_note"] = "Held-out tasks were not measured: the starting weights were not recorded."
        else:
            say(f"held-out task(s) {', '.join(held)}: probing the model before and after finetuning")
            note = "" if pretrained else "before = the untrained initial weights (no pretraining in this run)"
            forgetting["held_out_tasks"] = measure_held_out(before, model, ds, held, device, seed=cfg.seed,
                                                            n_boot=cfg.n_bootstrap, bf16=cfg.bf16,
                                                            batch_size=cfg.eval_batch_size, before_note=note)
    del before
    metrics = {
        "split": "test", **info, "subjects": ds.manifest.get("subjects"), "tasks": results,
        "wall_seconds": round(time.perf_counter() - t0, 1), "kit_version": __version__, "data": data_summary(ds),
        "forgetting": forgetting,
    }
    if lines is not None:
        metrics["lines"] = lines
    extra_files: dict[str, Path] = {}
    extra_texts = {"calibration.json": json.dumps(calibration, indent=1)}
    if start is not None and cfg.lines.store_base:
        work.mkdir(parents=True, exist_ok=True)
        extra_files[LINES_BASE] = save_state(start, work / "lines-base.safetensors")
        scaled = lines is not None and (lines["alpha"], lines["beta"]) != (1.0, 0.0)
        if scaled:
            extra_files[LINES_FINETUNED] = save_state(ft_state, work / "lines-finetuned.safetensors")
        extra_texts[LINES_JSON] = json.dumps({
            "alpha": lines["alpha"] if lines else 1.0, "beta": lines["beta"] if lines else 0.0,
            "searched": lines is not None, "base": LINES_BASE, "base_is_pretrained": pretrained,
            "finetuned": LINES_FINETUNED if scaled else "model.safetensors",
        }, indent=1)
    tasks_meta = {name: t for name, t in ds.manifest["tasks"].items() if name in {s.name for s in tasks}}
    config_text = train_config_text or train_config_yaml(cfg)
    report = render_report(metrics, calibration)
    bundle_dir = write_bundle(
        target_dir,
        vertical=vertical,
        model=model.cpu(),
        tokenizer_file=Path(dataset_dir) / "tokenizer.json",
        tasks={"tasks": tasks_meta, "max_len": ds.manifest.get("max_len"), "vocab_size": ds.vocab_size},
        metrics=metrics,
        train_config_yaml=config_text,
        extra_files=extra_files,
        extra_texts={**extra_texts, **report},
        model_card=report["report/report.md"],  # the card is the report's Markdown (rendered once: figures are slow)
    )
    for path in extra_files.values():
        path.unlink(missing_ok=True)  # copied into the bundle
    return Finished(bundle_dir, pack_bundle(bundle_dir, packed), metrics)


def default_out(bundle: Path) -> Path:
    bundle = Path(bundle)
    stem = bundle.name[: -len(".kitbundle")] if bundle.name.endswith(".kitbundle") else bundle.name
    return bundle.parent / f"{stem}-lines"


def rescale_bundle(bundle_path: Path, data: Path | None, out: Path | None, overrides: list[str],
                   say: Callable[[str], None]) -> Finished:
    """`kit lines`: LiNeS search on a bundle's stored update, recalibrated and evaluated into a new bundle."""
    import tempfile

    from kit.bundle import open_bundle
    from kit.eval.bundle_eval import check_dataset_matches
    from kit.train.config import load_train_config
    from kit.train.data import load_dataset
    from kit.train.lines import load_state
    from kit.train.workflow import train_config_yaml

    t0 = time.perf_counter()
    bundle = open_bundle(bundle_path)
    say(f"bundle verified: {bundle_path} (kit {bundle.kit_version})")
    if not bundle.has(LINES_BASE):
        raise KitError(f"{bundle_path}: the bundle holds no {LINES_BASE} (the weights finetuning started from), so its "
                       "finetuning update cannot be rescaled",
                       hint="finetune again with this kit (lines.store_base=true, the default), or use kit finetune --lines")
    meta = bundle.read_json(LINES_JSON, default={"finetuned": "model.safetensors"})
    trained = bundle.read_json("metrics.json", default={})
    dataset = Path(data) if data is not None else Path(trained.get("dataset") or "")
    if not (dataset / "manifest.json").is_file():
        where = f"--data {data}" if data is not None else f"the bundle's dataset ({trained.get('dataset')})"
        raise KitError(f"{where} is not a built dataset", hint="pass --data with the dataset the bundle was trained on")
    check_dataset_matches(bundle, dataset)
    out = Path(out) if out is not None else default_out(bundle_path)
    if out.resolve() == Path(bundle_path).resolve() or out.resolve() == bundle.root.resolve():
        raise KitError(f"--out {out} is the bundle itself; choose another directory (bundles are never changed in place)")
    cfg = load_train_config(bundle.path("train_config.yaml"), ["lines.enabled=true", *overrides])
    ds = load_dataset(dataset)
    model = bundle.load_model()
    finetuned = None if meta.get("finetuned") == "model.safetensors" else load_state(bundle.path(meta["finetuned"]))
    start = load_state(bundle.path(LINES_BASE))
    info = {k: trained.get(k) for k in ("vertical", "backbone", "size", "lora")}
    info.update({"vertical": bundle.vertical, "dataset": str(dataset), "rescaled_from": str(bundle_path)})
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.work-", dir=out.parent) as work:
        return finish_bundle(vertical=bundle.vertical, model=model, ds=ds, dataset_dir=dataset, cfg=cfg, start=start,
                             pretrained=bool(meta.get("base_is_pretrained", True)), target_dir=out,
                             packed=out.parent / f"{out.name}.kitbundle", work=Path(work), info=info, t0=t0, say=say,
                             finetuned=finetuned, train_config_text=train_config_yaml(cfg))
