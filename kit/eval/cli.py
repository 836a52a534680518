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
) -> None:
    """Score a bundle with its own calibration: AUROC, AUPRC, Brier, ECE, threshold metrics, subgroups, intervals.

    Example:

      kit evaluate --bundle kit-runs/clinical/clinical.kitbundle --data kit-runs/clinical/dataset --out eval/
    """
    from kit.eval.bundle_eval import evaluate_bundle
    from kit.train.cli import results_table

    metrics = evaluate_bundle(bundle, data, out, split=split, n_boot=n_bootstrap, batch_size=batch_size, device=device,
                              say=console.print)
    console.print(results_table(metrics))
    console.print(f"metrics: {out / 'metrics.json'}  report: {out / 'report' / 'index.html'}  ({metrics['wall_seconds']:.0f}s)")


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_command)
