"""What the dataset writer needs to know about a task, whatever vertical defined it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import polars as pl


@dataclass(frozen=True)
class TaskInfo:
    name: str
    type: str  # binary | multiclass | multilabel | regression | forecast
    metric: str
    description: str
    prompt: str
    classes: list[str] | None = None  # multiclass classes / multilabel labels, in label-index order
    class_descriptions: list[str] | None = None
    sample_weight: str = "uniform"  # uniform | inverse_subject_samples
    forecast_events: int | None = None  # forecast tasks: how many next tokens are the target
    baselines: tuple[str, ...] = ("logistic",)  # classical baselines evaluation reports beside the model (kit.eval.baseline)
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def task_token(self) -> str:
        return f"[TASK:{self.name}]"


class PreparedTask(Protocol):
    """A task ready to label chunks of subjects (its data-driven parts already fit on the train split)."""

    @property
    def info(self) -> TaskInfo: ...

    def label(self, events: pl.DataFrame, subjects: pl.DataFrame, shared: dict | None = None) -> pl.DataFrame:
        """Rows: subject_id, prediction_time, status ("ok", "censored", "excluded:<why>"), label, labels, label_mask.

        `shared` is a dict the writer creates per chunk and passes to every task, so tasks can cache what they
        all derive from the chunk (encounters, deaths) instead of recomputing it."""
        ...


class Vertical(Protocol):
    """What `kit dataset build` asks of a vertical found through `kit.registry.vertical(name)`."""

    name: str

    def task_names(self) -> list[str]: ...

    def load_tasks(self, names: list[str] | None, files: list[str]) -> list[Any]: ...

    def prepare(self, specs: list[Any], train_events: pl.LazyFrame, context: dict[str, Any]) -> list[PreparedTask]: ...
