"""Finance task specs: declarative YAML/TOML files a user can copy and edit, validated by pydantic.

The same spec model as the clinical vertical (name, description, type, metric, cohort, prediction_time, horizon,
label, censoring, sample_weight, prompt); the cohorts, prediction times and label rules are the finance ones:

* `label_event`: the target is a `LABEL/...` event of the event store (docs/finance-event-store.md): the AMLSim
  suspicious-account flag, the UCI default, the German credit risk, the news sentiment. The prediction time is the
  label's time plus `offset_days` (never after it), or a fixed date for a table without time.
* `next_category`: self-supervised, the category of the next transaction (MCC, else bank transaction code, else the
  transaction type), predicted from the transactions strictly before it.
* `large_outflow`: self-supervised, a large outflow (at or above a quantile of the train split's outflows, per
  currency) within `horizon.days` of the prediction time.

Unknown fields and impossible combinations fail with a message naming the field (see `load_task_spec`).
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kit.specfile import parse_spec, read_spec_file

TaskType = Literal["binary", "multiclass"]
METRICS: dict[str, tuple[str, ...]] = {"binary": ("auroc", "auprc"), "multiclass": ("auroc", "accuracy")}
BASELINES = ("logistic", "gbt")
_NAME = re.compile(r"^[a-z][a-z0-9_]{1,63}$")
LABEL_PREFIX = "LABEL/"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Cohort(_Strict):
    """Which subjects and moments are samples."""

    exclude_source_types: list[str] = Field(
        default_factory=list, description="Transactions of these sources (event `source_type`) are not samples.")
    min_history: int = Field(1, ge=0, description="Transactions a subject needs strictly before the prediction time.")
    max_samples_per_subject: int | None = Field(
        None, ge=1, description="Keep at most this many samples per subject, evenly spaced in time.")


class PredictionTime(_Strict):
    """`label_time`: the label event's time plus `offset_days` (<= 0). `fixed`: `date` (a table without time).
    `transaction`: each distinct time a subject has a transaction (its own transactions at that time are not input).
    `periodic`: every `every_days` after the subject's first transaction."""

    at: Literal["label_time", "fixed", "transaction", "periodic"]
    offset_days: float = Field(0.0, le=0, description="label_time: days added to the label's time (<= 0).")
    date: datetime | None = Field(None, description="fixed: the prediction time.")
    every_days: float | None = Field(None, gt=0, description="periodic: days between prediction times.")


class Horizon(_Strict):
    days: float | None = Field(None, gt=0, description="Label window [prediction time, + days).")


class LabelEventRule(_Strict):
    """The label is a `LABEL/...` event of the subject: numeric_value 1/0 (binary), or its raw text mapped to a class
    (multiclass: `classes` maps a class name to the raw values that mean it, in class-index order)."""

    rule: Literal["label_event"]
    code: str
    classes: dict[str, list[str]] | None = None


class NextCategoryRule(_Strict):
    """Multiclass: the category of the first transaction at the prediction time.

    A transaction's category is the first of `category_prefixes` it has an event for (same subject, time and source
    record): an `MCC/` code, else a camt `BTC/` code, else its `TXN/` type. The classes are the `top_k` most frequent
    categories of the train split (at least `min_count` transactions), unless `codes` lists them; every other
    category is `other_class` (or the sample is excluded when it is null)."""

    rule: Literal["next_category"]
    category_prefixes: list[str] = Field(default_factory=lambda: ["MCC/", "BTC/", "TXN/"])
    top_k: int = Field(8, ge=2, le=256)
    min_count: int = Field(20, ge=1)
    codes: list[str] | None = None
    other_class: str | None = "other"


class LargeOutflowRule(_Strict):
    """Binary: an outflow (a `TXN/` event with a negative amount) at least `min_amount`, or at least the `quantile`
    of the train split's outflow sizes in its currency, inside the horizon."""

    rule: Literal["large_outflow"]
    quantile: float | None = Field(0.9, gt=0, lt=1)
    min_amount: float | None = Field(None, gt=0)


LabelRule = Annotated[Union[LabelEventRule, NextCategoryRule, LargeOutflowRule], Field(discriminator="rule")]
_RULE_TYPES = {"label_event": ("binary", "multiclass"), "next_category": ("multiclass",), "large_outflow": ("binary",)}
_RULE_TIMES = {"label_event": ("label_time", "fixed"), "next_category": ("transaction",),
               "large_outflow": ("periodic", "transaction")}


class Censoring(_Strict):
    """`follow_up`: a sample whose window runs past the end of its source's data is excluded (censored); the end of a
    source is its latest transaction day in the train split. `none`: keep every sample."""

    rule: Literal["follow_up", "none"] = "follow_up"


class TaskSpec(_Strict):
    name: str = Field(..., description="Task id: lower_snake_case; also the task token [TASK:name].")
    description: str
    type: TaskType
    metric: str | None = None
    cohort: Cohort = Field(default_factory=Cohort)
    prediction_time: PredictionTime
    horizon: Horizon = Field(default_factory=Horizon)
    label: LabelRule
    censoring: Censoring = Field(default_factory=Censoring)
    sample_weight: Literal["uniform", "inverse_subject_samples"] = "uniform"
    baselines: list[Literal["logistic", "gbt"]] = Field(
        default_factory=lambda: ["logistic"], description="Classical baselines reported beside the model.")
    prompt: str = Field(..., description="Text prompt form, for a text-LM backbone.")

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"field `{field}`: {why}")

        if not _NAME.match(self.name):
            raise bad("name", f"{self.name!r} must be lower_snake_case (a-z, 0-9, _), 2-64 characters")
        rule = self.label
        if self.type not in _RULE_TYPES[rule.rule]:
            raise bad("type", f"{self.type!r} does not fit label rule {rule.rule!r} (use {' or '.join(_RULE_TYPES[rule.rule])})")
        if self.metric is None:
            self.metric = METRICS[self.type][0]
        elif self.metric not in METRICS[self.type]:
            raise bad("metric", f"{self.metric!r} is not a {self.type} metric (use one of {', '.join(METRICS[self.type])})")
        pt = self.prediction_time
        if pt.at not in _RULE_TIMES[rule.rule]:
            raise bad("prediction_time.at", f"{pt.at!r} does not fit label rule {rule.rule!r} (use {' or '.join(_RULE_TIMES[rule.rule])})")
        if pt.at == "fixed" and pt.date is None:
            raise bad("prediction_time.date", "prediction_time.at `fixed` needs a date")
        if pt.at == "periodic" and pt.every_days is None:
            raise bad("prediction_time.every_days", "prediction_time.at `periodic` needs every_days")
        if isinstance(rule, LabelEventRule):
            if not rule.code.startswith(LABEL_PREFIX):
                raise bad("label.code", f"{rule.code!r} is not a label code (they start with {LABEL_PREFIX!r} and are never inputs)")
            if self.type == "multiclass" and not rule.classes:
                raise bad("label.classes", "a multiclass label_event task maps class names to raw label values")
            if self.type == "binary" and rule.classes:
                raise bad("label.classes", "a binary label_event task reads numeric_value 1/0; drop classes or use type multiclass")
            if rule.classes and len(rule.classes) < 2:
                raise bad("label.classes", "a multiclass task needs at least two classes")
        if isinstance(rule, LargeOutflowRule):
            if self.horizon.days is None:
                raise bad("horizon.days", "label rule 'large_outflow' needs a window")
            if (rule.quantile is None) == (rule.min_amount is None):
                raise bad("label.quantile", "set exactly one of label.quantile and label.min_amount")
        if isinstance(rule, NextCategoryRule):
            if rule.codes is not None and len(rule.codes) + (rule.other_class is not None) < 2:
                raise bad("label.codes", "a multiclass task needs at least two classes")
            if not rule.category_prefixes:
                raise bad("label.category_prefixes", "needs at least one code prefix")
        if "gbt" in self.baselines and self.type not in ("binary", "multiclass"):
            raise bad("baselines", "gbt is a classifier baseline")
        return self

    @property
    def task_token(self) -> str:
        return f"[TASK:{self.name}]"


def parse_task_spec(data: dict, source: str = "<dict>") -> TaskSpec:
    return parse_spec(TaskSpec, data, source, _RULE_TYPES)


def load_task_spec(path: Path | str) -> TaskSpec:
    """Read a task spec from YAML (.yaml/.yml) or TOML (.toml)."""
    return parse_task_spec(read_spec_file(path), str(path))
