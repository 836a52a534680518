"""The clinical vertical object that `kit.registry.vertical("clinical")` returns."""

from __future__ import annotations

from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import polars as pl

import yaml

from kit.specfile import select_specs
from verticals.clinical.labelers import ClinicalTask, FollowUp, choose_condition_codes
from verticals.clinical.spec import NewConditionRule, NextEncounterClassRule, TaskSpec, load_task_spec, parse_task_spec

TASKS_PACKAGE = "verticals.clinical.tasks"


def _shipped() -> dict[str, TaskSpec]:
    out = {}
    for entry in sorted(resources.files(TASKS_PACKAGE).iterdir(), key=lambda e: e.name):
        if entry.name.endswith((".yaml", ".yml")):
            spec = parse_task_spec(yaml.safe_load(entry.read_text()), f"{TASKS_PACKAGE}/{entry.name}")
            out[spec.name] = spec
    return out


class ClinicalVertical:
    name = "clinical"
    description = "Clinical prediction tasks over FHIR-derived events (mortality, readmission, length of stay, ...)"

    def ingest(self, paths: list[Path], out: Path, **options: Any) -> Any:
        """Raw clinical records (FHIR Bundles / Bulk NDJSON) to an event store, through the FHIR connector."""
        from connectors.fhir.cli import print_summary, run_ingest

        summary = run_ingest([Path(p) for p in paths], Path(out), **options)
        if options.get("show_progress"):
            print_summary(summary)
        return summary

    def prediction_formats(self) -> dict[str, Any]:
        """Wire formats for `kit predict` and `kit serve`: FHIR Bundles in, RiskAssessment out (the native one)."""
        from connectors.fhir.predict import FhirFormat

        return {"fhir": FhirFormat()}

    def task_names(self) -> list[str]:
        return list(_shipped())

    def task_spec_path(self, name: str) -> Path:
        return Path(str(resources.files(TASKS_PACKAGE) / f"{name}.yaml"))

    def load_tasks(self, names: list[str] | None, files: list[str] = ()) -> list[TaskSpec]:
        """The shipped tasks named (all when None), then the user's spec files; names must be unique."""
        return select_specs("clinical", _shipped(), names, files, load_task_spec)

    def prepare(self, specs: list[TaskSpec], train_events: pl.LazyFrame, context: dict[str, Any]) -> list[ClinicalTask]:
        fu = context.get("follow_up") or {}
        follow_up = FollowUp(
            rule=fu.get("rule", "last_event"),
            dataset_end=context.get("dataset_end"),
            fixed_date=datetime.fromisoformat(str(fu["date"])) if fu.get("date") else None,
        )
        codes: pl.DataFrame = context.get("codes", pl.DataFrame(schema={"code": pl.String, "description": pl.String}))
        describe = dict(codes.select("code", "description").iter_rows()) if codes.height else {}
        tasks = []
        for spec in specs:
            task = ClinicalTask(spec=spec, follow_up=follow_up)
            if isinstance(spec.label, NextEncounterClassRule):
                task.classes = list(spec.label.classes) + ([spec.label.none_class] if spec.label.none_class else [])
            elif isinstance(spec.label, NewConditionRule):
                fixed = (context.get("task_classes") or {}).get(spec.name)
                # A bundle's classes when given (scoring another population with its heads), else fit on train.
                chosen = pl.DataFrame({"code": fixed}) if fixed else choose_condition_codes(train_events, spec.label)
                task.condition_codes = chosen.get_column("code").to_list()
                task.classes = list(task.condition_codes)
                task.class_descriptions = [describe.get(c) or c for c in task.condition_codes]
            tasks.append(task)
        return tasks


vertical = ClinicalVertical()
