"""`kit dataset build|show|tasks` and `kit tokenize --show SUBJECT`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from kit.errors import KitError

console = Console()

dataset_app = typer.Typer(
    help=(
        "Build and inspect prompted multitask datasets.\n\n"
        "Example:\n\n  kit dataset build --vertical clinical --events kit-runs/events --out kit-runs/dataset\n\n"
        "  kit dataset show kit-runs/dataset"
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _positives(c: dict, kind: str) -> str:
    if kind == "multiclass":
        return "/".join(str(v) for v in (c.get("class_counts") or []))
    if kind in ("binary", "multilabel"):
        return f"{c.get('positives', 0):,}"
    return "-"


def cohort_table(manifest: dict, title: str, by_split: bool = False) -> Table:
    """One row per task (or per task and split): cohort, excluded, censored, samples, positives, prevalence."""
    from kit.datasets.splits import SPLITS

    t = Table(title=title, title_justify="left")
    cols = [("task", "left"), ("type", "left")] + ([("split", "left")] if by_split else [])
    cols += [("cohort", "right"), ("excl.", "right"), ("cens.", "right"),
             ("samples" if by_split else "samples tr/va/te", "right"), ("pos.", "right"), ("prev.", "right"),
             ("mix", "right")]
    for col, just in cols:
        t.add_column(col, justify=just)
    for name, task in manifest["tasks"].items():
        counts = [task["counts"][s] for s in SPLITS]
        if by_split:
            groups = [(s, c) for s, c in zip(SPLITS, counts)]
        else:
            total = {k: sum(c[k] for c in counts) for k in ("cohort", "censored", "samples")}
            total["excluded"] = {"all": sum(sum(c["excluded"].values()) for c in counts)}
            total["positives"] = sum(c.get("positives", 0) for c in counts)
            if task["type"] == "multiclass":
                total["class_counts"] = [sum(x) for x in zip(*[c.get("class_counts") or [] for c in counts])]
            total["prevalence"] = (total["positives"] / total["samples"]) if task["type"] in ("binary", "multilabel") and total["samples"] else None
            total["split_samples"] = "/".join(f"{c['samples']:,}" for c in counts)
            groups = [(None, total)]
        for i, (split, c) in enumerate(groups):
            row = [name if i == 0 else "", task["type"] if i == 0 else ""] + ([split] if by_split else [])
            row += [f"{c['cohort']:,}", f"{sum(c['excluded'].values()):,}", f"{c['censored']:,}",
                    f"{c['samples']:,}" if by_split else c["split_samples"], _positives(c, task["type"]),
                    _fmt(c.get("prevalence")), _fmt(task["sampling_weight"]) if i == 0 else ""]
            t.add_row(*row, end_section=by_split and i == len(groups) - 1)
    return t


def small_task_warnings(manifest: dict, threshold: int) -> list[str]:
    out = []
    for name, task in manifest["tasks"].items():
        total = {k: sum(c[k] for c in task["counts"].values()) for k in ("cohort", "censored", "samples")}
        excluded = sum(sum(c["excluded"].values()) for c in task["counts"].values())
        pos = sum(c.get("positives", 0) for c in task["counts"].values())
        nums = f"cohort {total['cohort']:,}, excluded {excluded:,}, censored {total['censored']:,}, samples {total['samples']:,}"
        if total["samples"] < threshold:
            out.append(f"task {name}: only {total['samples']} samples ({nums})")
        elif task["type"] == "binary" and pos < 5:
            out.append(f"task {name}: only {pos} positives ({nums}); metrics on it will be unreliable")
        empty = [s for s in ("train", "val", "test") if task["counts"][s]["samples"] == 0]
        if total["samples"] and empty:
            out.append(f"task {name}: no {'/'.join(empty)} samples ({nums})")
    return out


@dataset_app.command("build")
def build_command(
    events: Path = typer.Option(..., "--events", help="Event store directory written by `kit ingest`."),
    vertical: str = typer.Option(..., "--vertical", help="Vertical whose tasks to build (e.g. clinical)."),
    out: Path = typer.Option(None, "--out", help="Output directory (default: kit-runs/<vertical>-dataset)."),
    config: Path = typer.Option(None, "--config", help="Build config YAML (splits, tokenizer, mixing, follow_up, tasks)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config field, e.g. --set tokenizer.max_len=512."),
    tasks: str = typer.Option(None, "--tasks", help="Comma-separated task names (default: all of the vertical's)."),
    task_file: list[Path] = typer.Option([], "--task-file", help="Extra task spec file (YAML/TOML); repeatable."),
) -> None:
    """Build a leakage-free prompted multitask dataset from an event store.

    Example:

      kit dataset build --vertical clinical --events kit-runs/events --out kit-runs/dataset --set tokenizer.max_len=512
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kit.datasets.build import build_dataset
    from kit.datasets.config import load_config

    overrides = list(set_)
    cfg = load_config(config, overrides)
    if tasks:
        cfg.tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if task_file:
        cfg.task_files = [*cfg.task_files, *map(str, task_file)]
    out = out or Path("kit-runs") / f"{vertical}-dataset"
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    ) as progress:
        bar = progress.add_task("reading the event store", total=None)
        manifest = build_dataset(
            vertical, events, out, cfg,
            on_stage=lambda text: progress.update(bar, description=text),
            on_chunk=lambda done, total: progress.update(bar, completed=done, total=total),
        )
    console.print(cohort_table(manifest, f"{vertical} dataset -> {out}"))
    for w in small_task_warnings(manifest, cfg.min_cohort_warning):
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    left_out = manifest.get("subjects_left_out", {}).get("no_subject_record", 0)
    if left_out:
        console.print(
            f"[yellow]warning:[/] {left_out:,} subjects have events but no subject record (no FHIR Patient: no birth, "
            "sex or death), so they are left out",
            highlight=False,
        )
    subj = manifest["subjects"]
    console.print(
        f"subjects train/val/test: {subj['train']:,}/{subj['val']:,}/{subj['test']:,}; vocab {manifest['vocab_size']:,}; "
        f"max_len {manifest['max_len']}; config hash {manifest['config_hash'][:12]}",
        highlight=False,
    )


@dataset_app.command("show")
def show_command(path: Path = typer.Argument(..., help="A dataset directory written by `kit dataset build`.")) -> None:
    """Print a dataset's manifest as tables: tasks, counts and prevalence per split, mixing weights.

    Example:

      kit dataset show kit-runs/dataset
    """
    from kit.datasets.build import read_manifest

    m = read_manifest(path)
    head = Table(show_header=False, title=f"dataset {path}", title_justify="left")
    head.add_column(style="bold")
    head.add_column()
    subj = m["subjects"]
    for k, v in [
        ("vertical", m["vertical"]), ("events", m["events_dir"]), ("vocab size", f"{m['vocab_size']:,}"),
        ("max_len", str(m["max_len"])), ("subjects train/val/test", f"{subj['train']:,} / {subj['val']:,} / {subj['test']:,}"),
        ("follow-up ends", m["follow_up"]["rule"]), ("mixing temperature", str(m["mixing"]["temperature"])),
        ("prompt", m["prompt"]["about"]), ("config hash", m["config_hash"]),
    ]:
        head.add_row(k, v)
    console.print(head)
    console.print(cohort_table(m, "tasks (all splits)"))
    console.print(cohort_table(m, "per split", by_split=True))
    for w in small_task_warnings(m, m["config"].get("min_cohort_warning", 20)):
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    for name, task in m["tasks"].items():
        if task.get("classes"):
            descr = task.get("class_descriptions") or task["classes"]
            console.print(f"[bold]{name}[/] classes: " + ", ".join(f"{c} ({d})" if d != c else c for c, d in zip(task["classes"], descr)), highlight=False)


@dataset_app.command("tasks")
def tasks_command(vertical: str = typer.Option(..., "--vertical", help="Vertical name, e.g. clinical.")) -> None:
    """List a vertical's shipped task specs and where their YAML files are (copy one to make your own).

    Example:

      kit dataset tasks --vertical clinical
    """
    from kit import registry

    v = registry.vertical(vertical)
    t = Table(title=f"{vertical} tasks", title_justify="left")
    for col in ("task", "type", "description", "spec file"):
        t.add_column(col)
    for spec in v.load_tasks(None, []):
        path = v.task_spec_path(spec.name) if hasattr(v, "task_spec_path") else ""
        t.add_row(spec.name, spec.type, spec.description, str(path))
    console.print(t)


def tokenize_command(
    show: str = typer.Option(..., "--show", help="Subject to show: event-store subject_id or source id (FHIR Patient id)."),
    dataset: Path = typer.Option(None, "--dataset", help="Dataset directory (its tokenizer.json and event store)."),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="A tokenizer.json (instead of --dataset)."),
    events: Path = typer.Option(None, "--events", help="Event store (default: the dataset's)."),
    before: str = typer.Option(None, "--before", help="Only tokens strictly before this time (ISO), as a sample sees them."),
    limit: int = typer.Option(400, "--limit", help="Show at most the last N tokens (0 = all)."),
    text: bool = typer.Option(False, "--text", help="Print the text form a text-LM backbone reads instead of a table."),
) -> None:
    """Print a subject's token sequence, human-readable: time, age, type, visit, token and code description.

    Example:

      kit tokenize --show 963dabe4-84e7-4751-b432-e34bdb6aa4b4 --dataset kit-runs/dataset
    """
    from datetime import datetime

    import polars as pl

    from kit.datasets.build import TOKENIZER, read_manifest
    from kit.events import read_codes, read_subjects, scan_events
    from kit.tokenizer import TYPE_NAMES, Tokenizer

    if tokenizer is None and dataset is None:
        raise KitError("give --dataset DIR (a built dataset) or --tokenizer FILE with --events DIR")
    if tokenizer is None:
        tokenizer = dataset / TOKENIZER
    if events is None:
        if dataset is None:
            raise KitError("--events DIR is needed with --tokenizer")
        events = Path(read_manifest(dataset)["events_dir"])
    tk = Tokenizer.load(tokenizer)
    subjects = read_subjects(events)
    match = subjects.filter(pl.col("source_subject_id") == show)
    if match.height == 0 and show.lstrip("-").isdigit():
        match = subjects.filter(pl.col("subject_id") == int(show))
    if match.height == 0:
        raise KitError(f"subject {show!r} not found in {events} (give a subject_id or a source id such as a FHIR Patient id)")
    sid = match.item(0, "subject_id")
    ev = scan_events(events).filter(pl.col("subject_id") == sid).collect()
    tokens = tk.encode(ev, match)
    if before:
        try:
            cut = datetime.fromisoformat(before)
        except ValueError:
            raise KitError(f"--before {before!r}: not an ISO date/time") from None
        tokens = tokens.filter(pl.col("time") < cut)
    try:
        describe = dict(read_codes(events).select("code", "description").iter_rows())
    except KitError:
        describe = {}
    n = tokens.height
    shown = tokens.tail(limit) if limit else tokens
    if text:
        from kit.datasets.text import history_text

        console.print(
            history_text(
                shown.get_column("token_id").to_list(), shown.get_column("time").to_list(),
                shown.get_column("age").to_list(), shown.get_column("type").to_list(), "(the task prompt)", tk, describe,
            ),
            highlight=False, markup=False,
        )
        return
    t = Table(title=f"subject {sid} ({match.item(0, 'source_subject_id')}): {n:,} tokens"
              + (f", last {shown.height} shown" if shown.height < n else ""), title_justify="left")
    for col, just in [("#", "right"), ("time", "left"), ("age", "right"), ("type", "left"), ("visit", "right"),
                      ("token", "left"), ("id", "right")]:
        t.add_column(col, justify=just, no_wrap=True)
    t.add_column("description", no_wrap=True, overflow="ellipsis", max_width=48)
    start = n - shown.height
    for i, r in enumerate(shown.iter_rows(named=True)):
        base = r["token"].split("#Q")[0].split("=")[0]
        t.add_row(
            str(start + i), r["time"].strftime("%Y-%m-%d %H:%M"), f"{r['age']:.1f}", TYPE_NAMES.get(r["type"], "?"), str(r["visit"] or ""),
            r["token"] if r["token_id"] != 1 else f"{r['token']} -> [UNK]", str(r["token_id"]), describe.get(base) or "",
        )
    console.print(t)


def register(app: typer.Typer) -> None:
    app.add_typer(dataset_app, name="dataset")
    app.command("tokenize")(tokenize_command)
