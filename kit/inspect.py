"""`kit inspect DIR`: what is in an event store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import typer


@dataclass
class StoreSummary:
    """Counts a person checks an ingest by; `kit inspect` prints them and tests compare them."""

    subjects: int
    subjects_with_events: int
    deaths: int
    events: int
    shards: int
    first_time: object
    last_time: object
    static_events: int
    vocabularies: list[tuple[str, int, int]]  # vocabulary, distinct codes, events
    top_codes: list[tuple[str, str | None, int]]  # code, description, events
    events_per_subject: dict[str, float]  # min, median, mean, max
    by_source: list[tuple[str, int]]  # FHIR resourceType (or other source), events
    quarantined: int
    quarantine_reasons: list[tuple[str, int]]  # reason (up to its first ':'), records


def summarize(root: Path | str, top: int = 15) -> StoreSummary:
    import polars as pl

    from kit.events import DATA_DIR, QUARANTINE_FILE, read_codes, read_subjects, scan_events

    root = Path(root)
    events = scan_events(root)
    subjects = read_subjects(root)
    codes = read_codes(root)
    vocab = pl.col("code").str.extract(r"^([^/|]+)", 1).fill_null("(none)")
    stats = events.select(
        pl.len().alias("events"),
        pl.col("time").min().alias("first"),
        pl.col("time").max().alias("last"),
        pl.col("time").is_null().sum().alias("static"),
        pl.col("subject_id").n_unique().alias("subjects"),
    ).collect()
    per_code = events.group_by("code").agg(pl.len().alias("n")).collect()
    per_vocab = (
        per_code.with_columns(vocab.alias("vocabulary"))
        .group_by("vocabulary")
        .agg(pl.len().alias("codes"), pl.col("n").sum().alias("events"))
        .sort(["events", "vocabulary"], descending=[True, False])
    )
    top_codes = (
        per_code.sort(["n", "code"], descending=[True, False])
        .head(top)
        .join(codes.select("code", "description"), on="code", how="left", maintain_order="left")
    )
    per_subject = events.group_by("subject_id").agg(pl.len().alias("n")).collect()["n"]
    by_source = (
        events.group_by("source_type").agg(pl.len().alias("n")).sort(["n", "source_type"], descending=[True, False])
        if "source_type" in events.collect_schema().names()
        else None
    )
    q = root / QUARANTINE_FILE
    reasons: dict[str, int] = {}
    quarantined = 0
    if q.exists():
        import json

        with q.open("rb") as fh:
            for line in fh:
                quarantined += 1
                head = str(json.loads(line).get("reason", "")).split(":", 1)[0]
                reasons[head] = reasons.get(head, 0) + 1
    deaths = subjects.filter(pl.col("death_time").is_not_null()).height if "death_time" in subjects.columns else 0
    return StoreSummary(
        subjects=subjects.height,
        subjects_with_events=stats["subjects"][0],
        deaths=deaths,
        events=stats["events"][0],
        shards=len(list((root / DATA_DIR).glob("*.parquet"))),
        first_time=stats["first"][0],
        last_time=stats["last"][0],
        static_events=stats["static"][0],
        vocabularies=[tuple(r) for r in per_vocab.iter_rows()],
        top_codes=[(r["code"], r["description"], r["n"]) for r in top_codes.iter_rows(named=True)],
        events_per_subject={
            "min": float(per_subject.min() or 0),
            "median": float(per_subject.median() or 0),
            "mean": float(per_subject.mean() or 0),
            "max": float(per_subject.max() or 0),
        },
        by_source=[tuple(r) for r in by_source.collect().iter_rows()] if by_source is not None else [],
        quarantined=quarantined,
        quarantine_reasons=sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:top],
    )


def print_summary(root: Path, s: StoreSummary) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    overview = Table(title=f"Event store {root}", title_justify="left", show_header=False)
    overview.add_column(style="bold")
    overview.add_column(justify="right")
    overview.add_row("subjects", f"{s.subjects:,}")
    overview.add_row("subjects with events", f"{s.subjects_with_events:,}")
    overview.add_row("deaths", f"{s.deaths:,}")
    overview.add_row("events", f"{s.events:,}")
    overview.add_row("static events (no time)", f"{s.static_events:,}")
    overview.add_row("shards", f"{s.shards}")
    overview.add_row("time span", f"{s.first_time} .. {s.last_time}")
    eps = s.events_per_subject
    overview.add_row(
        "events per subject",
        f"min {eps['min']:,.0f} / median {eps['median']:,.0f} / mean {eps['mean']:,.1f} / max {eps['max']:,.0f}",
    )
    overview.add_row("quarantined records", f"{s.quarantined:,}")
    console.print(overview)

    vocab = Table(title="Vocabularies", title_justify="left")
    vocab.add_column("vocabulary")
    vocab.add_column("codes", justify="right")
    vocab.add_column("events", justify="right")
    for v, n_codes, n_events in s.vocabularies:
        vocab.add_row(v, f"{n_codes:,}", f"{n_events:,}")
    console.print(vocab)

    if s.by_source:
        src = Table(title="Events by source", title_justify="left")
        src.add_column("source type")
        src.add_column("events", justify="right")
        for t, n in s.by_source:
            src.add_row(str(t), f"{n:,}")
        console.print(src)

    if s.quarantine_reasons:
        why = Table(title="Quarantine reasons (see quarantine.ndjson)", title_justify="left")
        why.add_column("reason")
        why.add_column("records", justify="right")
        for reason, n in s.quarantine_reasons:
            why.add_row(reason, f"{n:,}")
        console.print(why)

    top = Table(title="Top codes", title_justify="left")
    top.add_column("code")
    top.add_column("description", overflow="ellipsis", max_width=60)
    top.add_column("events", justify="right")
    for code, desc, n in s.top_codes:
        top.add_row(code, desc or "", f"{n:,}")
    console.print(top)


def inspect_command(
    path: Path = typer.Argument(..., help="An event store directory written by `kit ingest`."),
    top: int = typer.Option(15, "--top", help="How many of the most frequent codes to list."),
) -> None:
    """Summarize an event store: subjects, events, vocabularies, time span, top codes, events per subject.

    Example:

      kit inspect kit-runs/events
    """
    from kit.errors import KitError
    from kit.events import is_event_store

    if not path.exists():
        raise KitError(f"{path}: no such directory")
    if not is_event_store(path):
        raise KitError(f"{path}: not an event store (no metadata/dataset.json and data/)", hint="run `kit ingest` first")
    print_summary(path, summarize(path, top))


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_command)
