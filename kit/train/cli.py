"""`kit finetune`, `kit pretrain` and `kit config show|schema`."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from kit.errors import KitError

console = Console()
config_app = typer.Typer(help="Show the effective training config or its JSON schema.\n\nExample:\n\n  kit config show --set finetune.steps=500", no_args_is_help=True)

DATA_HELP = "Raw records (files/folders), an event store from `kit ingest`, or a dataset from `kit dataset build`."


def _overrides(
    config: Path | None, sets: list[str], backbone: str | None, size: str | None, lora: bool | None,
    keep_forecasting: float | None, device: str | None, steps: int | None = None,
):
    from kit.train.config import load_train_config

    extra = list(sets or [])
    if backbone:
        extra.append(f"model.backbone={backbone}")
    if size:
        extra.append(f"model.size={size}")
    if lora:
        extra.append("lora.enabled=true")
    if keep_forecasting is not None:
        extra.append(f"finetune.keep_forecasting={keep_forecasting}")
    if device:
        extra.append(f"device={device}")
    if steps is not None:
        extra.append(f"finetune.steps={steps}")
    return load_train_config(config, extra)


def _progress_factory():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    def factory(label: str, total: int):
        progress = Progress(
            TextColumn(f"[bold]{label}[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"), console=console, transient=False,
        )
        task = progress.add_task(label, total=total, info="")
        started = [False]

        def update(step: int, total_steps: int, record: dict) -> None:
            if not started[0]:
                progress.start()
                started[0] = True
            info = f"loss {record['loss']:.3f}"
            ev = record.get("eval")
            if ev:
                info += f" | val {ev['score']:.3f}"
            progress.update(task, completed=step, info=info)
            if step >= total_steps or record.get("eval", {}).get("stopped"):
                progress.stop()

        return update

    return factory


def _fmt(m: dict | None, key: str) -> str:
    if not m or key not in m:
        return "-"
    v = m[key]
    if v["value"] is None or (isinstance(v["value"], float) and math.isnan(v["value"])):
        return "n/a"
    lo, hi = v["ci95"]
    ci = "" if lo is None or (isinstance(lo, float) and math.isnan(lo)) else f" ({lo:.2f}-{hi:.2f})"
    return f"{v['value']:.2f}{ci}"


def results_table(metrics: dict) -> Table:
    """Per task: samples, prevalence, the model's AUROC and the baseline's, with 95% intervals (the rest is in
    metrics.json)."""
    table = Table(title=f"test split: {metrics.get('backbone')} ({metrics.get('size')}) vs count-feature baseline")
    table.add_column("task", no_wrap=True)
    table.add_column("n", justify="right", no_wrap=True)
    table.add_column("prev.", justify="right", no_wrap=True)
    table.add_column("AUROC (95% CI)", justify="right", no_wrap=True)
    table.add_column("baseline", justify="right", no_wrap=True)
    gbt = any("baseline_gbt" in t for t in metrics["tasks"].values())  # tasks whose spec asks for trees (tables)
    if gbt:
        table.add_column("GBT baseline", justify="right", no_wrap=True)
    for name, t in metrics["tasks"].items():
        prev = t.get("prevalence")
        prev_s = f"{prev:.3f}" if isinstance(prev, float) else ("-" if prev is None else "multi")
        cells = [name, str(t["n"]), prev_s, _fmt(t.get("model"), "auroc"), _fmt(t.get("baseline"), "auroc")]
        table.add_row(*cells, *([_fmt(t.get("baseline_gbt"), "auroc") if "baseline_gbt" in t else "-"] if gbt else []))
    return table


def finetune_command(
    vertical: str = typer.Option(..., "--vertical", help="Vertical whose tasks to train (e.g. clinical)."),
    data: list[Path] = typer.Option(..., "--data", help=DATA_HELP),
    workdir: Path | None = typer.Option(None, "--workdir", help="Workspace (default ./kit-runs/VERTICAL-TIMESTAMP)."),
    config: Path | None = typer.Option(None, "--config", help="Training config YAML (see `kit config show`)."),
    sets: list[str] = typer.Option([], "--set", help="Override a config field, e.g. --set finetune.steps=500."),
    dataset_sets: list[str] = typer.Option([], "--dataset-set", help="Override a dataset build field, e.g. tokenizer.max_len=256."),
    backbone: str | None = typer.Option(None, "--backbone", help="mamba (default) or transformer."),
    size: str | None = typer.Option(None, "--size", help="Size preset: tiny, small or base."),
    base_model: Path | None = typer.Option(None, "--base-model", help="Start from a pretrained local checkpoint (ours or HF); skips pretraining."),
    lora: bool = typer.Option(False, "--lora", help="Finetune LoRA adapters (peft) instead of all weights."),
    keep_forecasting: float | None = typer.Option(None, "--keep-forecasting", help="Weight of the next-event loss kept against forgetting, e.g. 0.1."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu or cuda."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --workdir."),
    single_task: str | None = typer.Option(None, "--single-task", help="Finetune on this one task only, to compare with the multitask run."),
    hold_out_task: list[str] = typer.Option([], "--hold-out-task", help="Leave this task out of finetuning and report it as forgetting (repeatable)."),
    lines: bool = typer.Option(False, "--lines", help="Search LiNeS scaling of the update on validation (task score vs forgetting)."),
) -> None:
    """Pretrain (unless --base-model), finetune on every task of the vertical, evaluate, and write the bundle.

    Example:

      kit finetune --vertical clinical --data path/to/fhir
    """
    from kit.train.workflow import FinetuneRequest, default_workdir, run_finetune

    cfg = _overrides(config, sets, backbone, size, lora, keep_forecasting, device)
    if single_task:
        cfg.finetune.tasks = [single_task]
    if hold_out_task:
        cfg.finetune.hold_out_tasks = sorted(set(cfg.finetune.hold_out_tasks) | set(hold_out_task))
    if lines:
        cfg.lines.enabled = True
    if resume and workdir is None:
        raise KitError("--resume needs the --workdir of the interrupted run")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and workdir is None:
        raise KitError("a distributed run (torchrun) needs an explicit --workdir shared by every rank")
    req = FinetuneRequest(vertical=vertical, data=list(data), workdir=workdir or default_workdir(vertical), config=cfg,
                          dataset_overrides=list(dataset_sets), base_model=base_model, resume=resume)
    from kit.train import distributed

    if int(os.environ.get("RANK", "0")) == 0:
        console.print(f"[bold]kit finetune[/] --vertical {vertical} -> workdir {req.workdir}")
    result = run_finetune(req, console.print, _progress_factory())
    distributed.shutdown()
    if result.bundle_dir is None:  # a non-zero rank of a distributed run
        return
    console.print(results_table(result.metrics))
    print_forgetting(result.metrics)
    console.print(f"bundle: {result.bundle_dir}  packed: {result.bundle_file}  ({result.metrics['wall_seconds']:.0f}s)")


def _f(v, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def print_forgetting(metrics: dict) -> None:
    """The held-out tasks and the LiNeS trade-off, when the run measured them (the rest is in the report)."""
    held = (metrics.get("forgetting") or {}).get("held_out_tasks") or {}
    if held:
        table = Table(title="held-out tasks (linear probe on frozen features, test split)")
        for col in ("task", "metric", "before", "after", "change (95% CI)"):
            table.add_column(col, justify="left" if col in ("task", "metric") else "right", no_wrap=True)
        for name, h in held.items():
            lo, hi = h.get("change_ci95") or [None, None]
            table.add_row(name, h.get("metric", "-"), _f(h.get("before")), _f(h.get("after")),
                          f"{_f(h.get('change'))} ({_f(lo, 2)}-{_f(hi, 2)})" if "change" in h else h.get("note", "-"))
        console.print(table)
    lines = metrics.get("lines")
    if lines:
        table = Table(title=f"LiNeS on validation: chose alpha={lines['alpha']:g}, beta={lines['beta']:g}")
        for col in ("alpha", "beta", "task score", "forgetting", ""):
            table.add_column(col, justify="right", no_wrap=True)
        for i, pt in enumerate(lines["curve"]):
            table.add_row(f"{pt['alpha']:g}", f"{pt['beta']:g}", _f(pt["task_score"]), _f(pt["forgetting"]),
                          "chosen" if i == lines["chosen"] else "")
        console.print(table)


def pretrain_command(
    vertical: str = typer.Option(..., "--vertical", help="Vertical whose data to pretrain on."),
    data: list[Path] = typer.Option(..., "--data", help=DATA_HELP),
    workdir: Path | None = typer.Option(None, "--workdir", help="Workspace (default ./kit-runs/VERTICAL-TIMESTAMP)."),
    config: Path | None = typer.Option(None, "--config", help="Training config YAML."),
    sets: list[str] = typer.Option([], "--set", help="Override a config field, e.g. --set pretrain.steps=500."),
    dataset_sets: list[str] = typer.Option([], "--dataset-set", help="Override a dataset build field."),
    backbone: str | None = typer.Option(None, "--backbone", help="mamba (default) or transformer."),
    size: str | None = typer.Option(None, "--size", help="Size preset: tiny, small or base."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu or cuda."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --workdir."),
) -> None:
    """Next-event (forecasting) pretraining of the backbone on the train split; the model lands in <workdir>/pretrain/model.

    Example:

      kit pretrain --vertical clinical --data kit-runs/events --workdir kit-runs/pre --set pretrain.steps=500
    """
    from kit.train.workflow import FinetuneRequest, default_workdir, run_finetune

    cfg = _overrides(config, sets, backbone, size, None, None, device)
    if cfg.pretrain.steps <= 0:
        raise KitError("pretrain.steps must be above 0 for `kit pretrain`")
    req = FinetuneRequest(vertical=vertical, data=list(data), workdir=workdir or default_workdir(vertical), config=cfg,
                          dataset_overrides=list(dataset_sets), resume=resume, pretrain_only=True)
    run_finetune(req, console.print, _progress_factory())
    console.print(f"pretrained model: {req.workdir / 'pretrain' / 'model'}  (use it with --base-model)")


@config_app.command("show")
def config_show(
    config: Path | None = typer.Option(None, "--config", help="Training config YAML."),
    sets: list[str] = typer.Option([], "--set", help="Override a field, e.g. --set finetune.steps=500."),
) -> None:
    """Print the effective training config (defaults, then the file, then --set overrides) as YAML.

    Example:

      kit config show --set model.backbone=transformer > my-config.yaml
    """
    from kit.train.workflow import train_config_yaml

    typer.echo(train_config_yaml(_overrides(config, sets, None, None, None, None, None)))


@config_app.command("schema")
def config_schema() -> None:
    """Print the training config's JSON schema.

    Example:

      kit config schema > kit-config.schema.json
    """
    from kit.train.config import TrainConfig

    typer.echo(json.dumps(TrainConfig.model_json_schema(), indent=2))


def lines_command(
    bundle: Path = typer.Option(..., "--bundle", help="A bundle directory or .kitbundle written with its base weights (lines/)."),
    data: Path | None = typer.Option(None, "--data", help="Its dataset (default: the dataset recorded in the bundle)."),
    out: Path | None = typer.Option(None, "--out", help="The new bundle directory (default: BUNDLE-lines beside it)."),
    sets: list[str] = typer.Option([], "--set", help="Override a config field, e.g. --set lines.max_score_drop=0.02."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu or cuda."),
) -> None:
    """Rescale a bundle's finetuning update with LiNeS, choose alpha/beta on validation, and write a new bundle.

    Each grid point scales layer l's update by alpha + beta * l / (layers - 1) (embeddings and LM head by alpha) and
    is scored on validation: task score versus forgetting (next-event loss increase). The chosen point is recalibrated
    and evaluated like `kit finetune`; the report shows the trade-off curve.

    Example:

      kit lines --bundle kit-runs/clinical/clinical.kitbundle --set lines.max_score_drop=0.02
    """
    from kit.train.finish import rescale_bundle

    result = rescale_bundle(bundle, data, out, list(sets) + ([f"device={device}"] if device else []), say=console.print)
    console.print(results_table(result.metrics))
    print_forgetting(result.metrics)
    console.print(f"bundle: {result.bundle_dir}  packed: {result.bundle_file}  ({result.metrics['wall_seconds']:.0f}s)")


def register(app: typer.Typer) -> None:
    app.command("finetune")(finetune_command)
    app.command("pretrain")(pretrain_command)
    app.command("lines")(lines_command)
    app.add_typer(config_app, name="config")
