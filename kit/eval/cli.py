"""`kit evaluate --bundle B --data PATH --out DIR`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console()


def evaluate_command(
    bundle: Path = typer.Option(..., "--bundle", help="A bundle directory or .kitbundle (verified before use)."),
    data: Path = typer.Option(..., "--data", help="A dataset built with the bundle's tokenizer (e.g. <workdir>/dataset)."),
    out: Path = typer.Option(..., "--out", help="Output directory: metrics.json and report/index.html."),
    split: str = typer.Option("test", "--split", help="test, val, train, or all (every row: another population)."),
    n_bootstrap: int = typer.Option(500, "--n-bootstrap", help="Bootstrap resamples for the 95% intervals."),
    batch_size: int = typer.Option(64, "--batch-size", help="Rows per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    compare: Path | None = typer.Option(None, "--compare", help="Another bundle (scored on the same rows: paired) or a "
                                        "metrics.json (unpaired) to compare with, e.g. the --single-task run's bundle."),
) -> None:
    """Score a bundle with its own calibration: AUROC, AUPRC, Brier, ECE, threshold metrics, subgroups, intervals.

    Example:

      kit evaluate --bundle kit-runs/clinical/clinical.kitbundle --data kit-runs/clinical/dataset --out eval/

    Multitask versus single-task (did the task cocktail help?):

      kit evaluate --bundle kit-runs/multi/bundle --data kit-runs/multi/dataset --out eval/ --compare kit-runs/single/bundle
    """
    from kit.eval.bundle_eval import evaluate_bundle
    from kit.train.cli import results_table

    metrics = evaluate_bundle(bundle, data, out, split=split, n_boot=n_bootstrap, batch_size=batch_size, device=device,
                              say=console.print, compare=compare)
    console.print(results_table(metrics))
    if metrics.get("comparison"):
        console.print(comparison_table(metrics["comparison"]))
    console.print(f"metrics: {out / 'metrics.json'}  report: {out / 'report' / 'index.html'}  ({metrics['wall_seconds']:.0f}s)")


def comparison_table(comparison: dict):
    from rich.table import Table

    def cell(v: dict | None) -> str:
        if not v or v.get("value") is None or v["value"] != v["value"]:
            return "n/a"
        lo, hi = v.get("ci95") or [None, None]
        ci = f" ({lo:.2f} to {hi:.2f})" if lo is not None and lo == lo else ""
        return f"{v['value']:.3f}{ci}"

    kind = "paired, same rows" if comparison.get("paired") else "unpaired"
    table = Table(title=f"{comparison['this_label']} vs {comparison['other_label']} ({kind})")
    for col in ("task", "metric", "this", "other", "difference", "verdict"):
        table.add_column(col, justify="right" if col in ("this", "other", "difference") else "left", no_wrap=col == "task")
    for name, t in comparison["tasks"].items():
        table.add_row(name, str(t["metric"]), cell(t.get("this")), cell(t.get("other")), cell(t.get("difference")),
                      t.get("verdict", "-"))
    return table


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_command)
