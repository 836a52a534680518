"""`kit bundle verify B` and `kit bundle info B`: check a bundle's hashes and show what it holds."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console()
bundle_app = typer.Typer(
    help=(
        "Check and describe model bundles (a bundle directory or a .kitbundle file).\n\n"
        "Example:\n\n  kit bundle verify kit-runs/clinical-20260101-120000/clinical.kitbundle"
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
)

BUNDLE_ARG = typer.Argument(..., help="A bundle directory or a .kitbundle file.")


@bundle_app.command("verify")
def verify_command(bundle: Path = BUNDLE_ARG) -> None:
    """Verify every file's SHA-256 against MANIFEST.json and the kit version; exit 2 with the reason if it fails.

    Example:

      kit bundle verify kit-runs/clinical/clinical.kitbundle
    """
    from kit.bundle import open_bundle

    b = open_bundle(bundle)
    table = Table(title=f"{bundle}: verified", show_lines=False)
    table.add_column("file")
    table.add_column("bytes", justify="right")
    table.add_column("sha256")
    for name, digest in sorted(b.manifest["files"].items()):
        table.add_row(name, f"{(b.root / name).stat().st_size:,}", digest[:16] + "...")
    console.print(table)
    console.print(f"[bold green]OK[/] {len(b.manifest['files'])} files match MANIFEST.json "
                  f"(kit {b.kit_version}, vertical {b.vertical})")


def _metric(v: dict | None) -> str:
    if not v or v.get("value") is None:
        return "-"
    val = v["value"]
    if isinstance(val, float) and math.isnan(val):
        return "n/a"
    lo, hi = v.get("ci95", [None, None])
    ci = f" [{lo:.2f}-{hi:.2f}]" if isinstance(lo, (int, float)) and not math.isnan(lo) else ""
    return f"{val:.3f}{ci}"


@bundle_app.command("info")
def info_command(bundle: Path = BUNDLE_ARG) -> None:
    """Show a verified bundle's kit version, model, tasks with their test metrics, calibration and files.

    Example:

      kit bundle info kit-runs/clinical/bundle
    """
    from kit.bundle import open_bundle

    b = open_bundle(bundle)
    config = b.read_json("config.json")
    metrics = b.read_json("metrics.json", default={})
    calibration = b.calibration
    backbone = config.get("backbone", {})
    head = Table.grid(padding=(0, 2))
    head.add_row("bundle", str(bundle))
    head.add_row("vertical", b.vertical)
    head.add_row("kit version", b.kit_version)
    head.add_row("created", str(b.manifest.get("created", "-")))
    head.add_row("backbone", f"{backbone.get('kind')} ({backbone.get('size')}), vocab {backbone.get('vocab_size')}")
    head.add_row("dataset subjects", str(metrics.get("subjects", "-")))
    head.add_row("files", f"{len(b.manifest['files'])} (verified)")
    console.print(head)
    table = Table(title="tasks")
    for col in ("task", "type", "test n", "AUROC", "AUPRC / acc.", "calibration", "threshold"):
        table.add_column(col, justify="left" if col in ("task", "type", "calibration") else "right", no_wrap=col == "task")
    for name, spec in b.tasks.get("tasks", {}).items():
        t = (metrics.get("tasks") or {}).get(name, {})
        m = t.get("model") or {}
        second = "auprc" if spec.get("type") in ("binary", "multilabel") else "accuracy"
        cal = (calibration.get("tasks") or {}).get(name, {})
        method = cal.get("method", "-")
        if method == "temperature":
            method += f" T={cal.get('temperature', float('nan')):.2f}"
        thr = cal.get("threshold")
        table.add_row(name, spec.get("type", "-"), str(t.get("n", "-")), _metric(m.get("auroc")), _metric(m.get(second)),
                      method, f"{thr:.3f}" if isinstance(thr, (int, float)) else "-")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(bundle_app, name="bundle")
