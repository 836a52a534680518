"""The finance vertical object that `kit.registry.vertical("finance")` returns."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from kit.errors import KitError
from kit.specfile import select_specs
from verticals.finance.labelers import FinanceTask, choose_categories, outflow_thresholds, source_ends
from verticals.finance.spec import LargeOutflowRule, NextCategoryRule, TaskSpec, load_task_spec, parse_task_spec

TASKS_PACKAGE = "verticals.finance.tasks"
# Files the connector may read, taken from a directory that also holds a text corpus (documentation is left out).
DATA_SUFFIXES = (".ofx", ".qfx", ".xml", ".csv", ".csv.gz", ".tsv", ".parquet", ".xml.gz")


def _shipped() -> dict[str, TaskSpec]:
    out = {}
    for entry in sorted(resources.files(TASKS_PACKAGE).iterdir(), key=lambda e: e.name):
        if entry.name.endswith((".yaml", ".yml")):
            spec = parse_task_spec(yaml.safe_load(entry.read_text()), f"{TASKS_PACKAGE}/{entry.name}")
            out[spec.name] = spec
    return out


def _expand(paths: list[Path]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if not p.exists():
            raise KitError(f"{p}: no such file or directory")
        out.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    return out


class FinanceVertical:
    name = "finance"
    description = ("Financial prediction tasks over account and client events (suspicious accounts, card default, "
                   "credit risk, next transaction category, large outflows) and news-sentiment text")
    # Label events are targets only: the dataset builder drops them from every tokenizer whatever its config says.
    target_code_prefixes = ("LABEL/",)

    def ingest(self, paths: list[Path], out: Path, **options: Any) -> Any:
        """Raw records to one event store: statements and tables through the finance connector (`kit ingest
        finance`), text corpora (`text,label` or `text` CSVs) through verticals/finance/text.py, and kit JSON
        documents (`{"subjects": [...], "events": [...]}`, as `kit serve` takes them) through
        verticals/finance/jsondocs.py."""
        from kit.fsutil import atomic_dir
        from verticals.finance.jsondocs import add_documents, is_json_document
        from verticals.finance.text import add_corpora, is_text_corpus

        files = _expand(paths)
        corpora = [f for f in files if is_text_corpus(f)]
        documents = [f for f in files if is_json_document(f)]
        taken = set(corpora) | set(documents)
        records: list[Path] = []
        for p in map(Path, paths):
            inside = _expand([p])
            if not any(f in taken for f in inside):
                records.append(p)  # the connector walks it and skips what is not an input
            elif p.is_dir():
                records.extend(f for f in inside if f not in taken and f.name.lower().endswith(DATA_SUFFIXES)
                               and not any(part.startswith(".") for part in f.relative_to(p).parts))
        with atomic_dir(Path(out)) as tmp:
            summary: Any = None
            if records:
                summary = _run_connector(records, tmp / "store", corpora=corpora, **options)
                for item in (tmp / "store").iterdir():
                    item.rename(tmp / item.name)
                (tmp / "store").rmdir()
            else:
                _empty_store(tmp)
            if corpora:
                text_report = add_corpora(tmp, corpora)
                if options.get("show_progress"):
                    from rich.console import Console

                    for f, r in text_report.items():
                        Console(stderr=True).print(f"text corpus {f}: {r['rows']:,} rows, labels {r['labels']}, "
                                                   f"{r['quarantined']} quarantined")
            if documents:
                doc_report = add_documents(tmp, documents, fail_fast=bool(options.get("fail_fast")))
                if options.get("show_progress"):
                    from rich.console import Console

                    for f, r in doc_report.items():
                        why = ", quarantined (reason in quarantine.ndjson)" if r["quarantined"] else ""
                        Console(stderr=True).print(f"JSON document {f}: {r['subjects']:,} subjects, {r['events']:,} "
                                                   f"events{why}")
        return summary

    def token_text(self, token: str) -> str | None:
        """A token's words for a `--base-model` checkpoint's own tokenizer (kit/train/base_vocab.py): a text's word
        (`TEXT/bullish` -> `bullish`), the code's words for other tokens (`TXN/DEBIT#Q3` -> `TXN DEBIT`)."""
        from kit.train.base_vocab import default_token_text
        from verticals.finance.text import TEXT_PREFIX

        if token.startswith(TEXT_PREFIX):
            return token[len(TEXT_PREFIX):] or None
        return default_token_text(token)

    def prediction_formats(self) -> dict[str, Any]:
        """`kit predict --format` / `kit serve --format`: kit's JSON, with `TEXT` events read as words."""
        from verticals.finance.jsondocs import FinanceJsonFormat

        return {"json": FinanceJsonFormat()}

    def task_names(self) -> list[str]:
        return list(_shipped())

    def task_spec_path(self, name: str) -> Path:
        return Path(str(resources.files(TASKS_PACKAGE) / f"{name}.yaml"))

    def load_tasks(self, names: list[str] | None, files: list[str] = ()) -> list[TaskSpec]:
        """The shipped tasks named (all when None), then the user's spec files; names must be unique."""
        return select_specs("finance", _shipped(), names, files, load_task_spec)

    def prepare(self, specs: list[TaskSpec], train_events: pl.LazyFrame, context: dict[str, Any]) -> list[FinanceTask]:
        """Fit on the train split what the specs leave to the data: categories, outflow thresholds, source ends."""
        fixed = context.get("task_classes") or {}
        ends = source_ends(train_events) if any(isinstance(s.label, LargeOutflowRule) for s in specs) else {}
        tasks = []
        for spec in specs:
            task = FinanceTask(spec=spec)
            rule = spec.label
            if isinstance(rule, NextCategoryRule):
                given = fixed.get(spec.name)
                if given:  # a bundle's classes: the category codes, then the other class when it has one
                    codes = [c for c in given if c != rule.other_class]
                    other = rule.other_class in given
                else:
                    table = choose_categories(train_events, spec)
                    codes = table.filter(pl.col("chosen")).get_column("category").to_list()
                    # An "other" class only when some category is left out (an empty class has no AUROC).
                    other = rule.other_class is not None and table.height > len(codes)
                task.category_codes = codes
                task.classes = codes + ([rule.other_class] if other else [])
            elif isinstance(rule, LargeOutflowRule):
                task.thresholds = outflow_thresholds(train_events, spec)
                task.source_end = ends
            elif rule.classes:
                task.classes = list(rule.classes)
            tasks.append(task)
        return tasks


def _empty_store(root: Path) -> None:
    """The metadata of an event store with no events yet (a text-only ingest)."""
    import json

    from kit.events import CODES_FILE, CODE_SCHEMA, DATASET_FILE, SUBJECTS_FILE, SUBJECT_SCHEMA

    (root / "metadata").mkdir(parents=True, exist_ok=True)
    pl.DataFrame(schema=SUBJECT_SCHEMA).write_parquet(root / SUBJECTS_FILE)
    pl.DataFrame(schema=CODE_SCHEMA).write_parquet(root / CODES_FILE)
    (root / DATASET_FILE).write_text(json.dumps({"dataset_name": "finance", "etl_name": "kit finance vertical (text)",
                                                 "meds_version": "0.4"}, indent=1))


def _run_connector(records: list[Path], out: Path, *, show_progress: bool = False, **options: Any) -> Any:
    """`kit ingest finance` on the statements and tables (options: layout, mappings, fail_fast, name)."""
    from connectors.finance.ingest import run_ingest

    options.pop("corpora", None)
    summary = run_ingest([Path(p) for p in records], Path(out), **options)
    if show_progress:
        from connectors.finance.cli import print_summary

        print_summary(summary)
    return summary


vertical = FinanceVertical()
