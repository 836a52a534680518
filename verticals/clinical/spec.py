"""Clinical task specs: declarative YAML/TOML files a user can copy and edit, validated by pydantic.

A spec names its cohort (which encounters are eligible), its prediction time, its horizon, its label rule, its
censoring rule, its type and its metric. Unknown fields and impossible combinations fail with a message naming the
field (see `load_task_spec`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kit.specfile import parse_spec, read_spec_file

# Encounter classes of the event store (docs/event-store.md): ENCOUNTER/<CLASS>/START and .../END.
ENCOUNTER_CLASSES = ("INPATIENT", "EMERGENCY", "AMBULATORY", "WELLNESS", "URGENTCARE", "HOME", "VIRTUAL", "OTHER")

TaskType = Literal["binary", "multiclass", "multilabel", "regression", "forecast"]
METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("auroc", "auprc"),
    "multiclass": ("auroc", "accuracy"),
    "multilabel": ("auroc", "auprc"),
    "regression": ("mae",),
    "forecast": ("perplexity", "top10_accuracy"),
}
_NAME = re.compile(r"^[a-z][a-z0-9_]{1,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Cohort(_Strict):
    """Which encounters are eligible; one sample per eligible encounter (optionally capped per subject)."""

    encounter_classes: list[str] | None = Field(None, description="Encounter classes eligible; null = all.")
    min_age_years: float | None = Field(None, ge=0)
    max_age_years: float | None = Field(None, ge=0)
    require_end: bool = Field(False, description="Only encounters with a recorded end (discharge).")
    max_samples_per_subject: int | None = Field(
        None, ge=1, description="Keep at most this many samples per subject, evenly spaced in time."
    )


class PredictionTime(_Strict):
    at: Literal["encounter_start", "encounter_end"]
    offset_hours: float = Field(0.0, ge=0, description="Hours after `at`; the encounter must still be open then.")


class Horizon(_Strict):
    """The label window (prediction time, window end]."""

    days: float | None = Field(None, gt=0, description="Window length after the prediction time.")
    until: Literal["fixed", "encounter_end"] = Field("fixed", description="`encounter_end`: the window ends at discharge.")


class DeathRule(_Strict):
    rule: Literal["death"]


class EncounterRule(_Strict):
    """Positive when an encounter of one of `classes` starts inside the window (e.g. readmission)."""

    rule: Literal["encounter"]
    classes: list[str]


class LengthOfStayRule(_Strict):
    """Binary: the encounter lasts more than `min_days`. Regression (type: regression): its length in days."""

    rule: Literal["length_of_stay"]
    min_days: float | None = Field(None, gt=0)


class NextEncounterClassRule(_Strict):
    """Multiclass: the group of the first encounter starting inside the window, or `none_class` if none does.

    Encounters starting at the same instant resolve to the group listed first."""

    rule: Literal["next_encounter_class"]
    classes: dict[str, list[str]]
    none_class: str | None = "none"


class NewConditionRule(_Strict):
    """Multilabel: each chosen chronic condition first diagnosed inside the window.

    The conditions are the `top_k` most frequent (by train-split subjects) condition codes that are rarely resolved
    (at most `max_resolved_fraction` of onsets have a later RESOLVED/ event) and diagnosed about once per subject
    (at most `max_onsets_per_subject` onsets per subject on average), unless `codes` lists them.
    A condition already diagnosed before the prediction time is not at risk: masked out (label_mask 0).
    """

    rule: Literal["new_condition"]
    top_k: int = Field(8, ge=1, le=256)
    min_subjects: int = Field(5, ge=1)
    max_resolved_fraction: float = Field(0.1, ge=0, le=1)
    max_onsets_per_subject: float = Field(
        1.1, ge=1, description="A chronic condition is diagnosed once; recurring episodes (e.g. miscarriage) are not."
    )
    codes: list[str] | None = None
    exclude_codes: list[str] = Field(default_factory=list)


class NextEventsRule(_Strict):
    """Self-supervised forecasting: the next `n_events` tokens at or after the prediction time."""

    rule: Literal["next_events"]
    n_events: int = Field(16, ge=1, le=1024)


LabelRule = Annotated[
    Union[DeathRule, EncounterRule, LengthOfStayRule, NextEncounterClassRule, NewConditionRule, NextEventsRule],
    Field(discriminator="rule"),
]

_RULE_TYPES = {
    "death": ("binary",),
    "encounter": ("binary",),
    "length_of_stay": ("binary", "regression"),
    "next_encounter_class": ("multiclass",),
    "new_condition": ("multilabel",),
    "next_events": ("forecast",),
}


class Censoring(_Strict):
    """`follow_up`: a sample whose follow-up ends before the window end without the outcome is excluded (censored);
    a recorded death inside the window still counts when death is the outcome. `none`: keep every sample."""

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
    prompt: str = Field(..., description="Text prompt form, for a text-LM backbone.")

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"field `{field}`: {why}")

        if not _NAME.match(self.name):
            raise bad("name", f"{self.name!r} must be lower_snake_case (a-z, 0-9, _), 2-64 characters")
        allowed = _RULE_TYPES[self.label.rule]
        if self.type not in allowed:
            raise bad("type", f"{self.type!r} does not fit label rule {self.label.rule!r} (use {' or '.join(allowed)})")
        if self.metric is None:
            self.metric = METRICS[self.type][0]
        elif self.metric not in METRICS[self.type]:
            raise bad("metric", f"{self.metric!r} is not a {self.type} metric (use one of {', '.join(METRICS[self.type])})")
        for field, classes in self._class_lists():
            unknown = [c for c in classes if c not in ENCOUNTER_CLASSES]
            if unknown:
                raise bad(field, f"unknown encounter class {', '.join(map(repr, unknown))} (known: {', '.join(ENCOUNTER_CLASSES)})")
        c = self.cohort
        if c.min_age_years is not None and c.max_age_years is not None and c.min_age_years > c.max_age_years:
            raise bad("cohort.min_age_years", "is above cohort.max_age_years: the cohort is empty")
        h = self.horizon
        needs_window = self.label.rule in ("death", "encounter", "next_encounter_class", "new_condition")
        if needs_window and h.until == "fixed" and h.days is None:
            raise bad("horizon.days", f"label rule {self.label.rule!r} needs a window: set horizon.days or horizon.until")
        if h.until == "encounter_end" and self.prediction_time.at == "encounter_end":
            raise bad("horizon.until", "the window ends at discharge but the prediction is made at discharge: it is empty")
        if self.label.rule == "length_of_stay":
            if self.prediction_time.at == "encounter_end":
                raise bad("prediction_time.at", "length of stay is known at discharge: predicting it then leaks the label")
            if self.label.min_days is not None and self.label.min_days * 24 <= self.prediction_time.offset_hours:
                raise bad(
                    "label.min_days",
                    f"{self.label.min_days} days is not after the prediction time ({self.prediction_time.offset_hours} h "
                    "after admission): every stay still open then is positive",
                )
            if self.type == "binary" and self.label.min_days is None:
                raise bad("label.min_days", "a binary length-of-stay task needs a threshold in days")
        if self.label.rule == "next_encounter_class":
            if not self.label.classes:
                raise bad("label.classes", "needs at least one class group")
            if self.label.none_class in self.label.classes:
                raise bad("label.none_class", f"{self.label.none_class!r} is also a class group name")
            if len(self.label.classes) + (self.label.none_class is not None) < 2:
                raise bad("label.classes", "a multiclass task needs at least two classes")
        return self

    def _class_lists(self) -> list[tuple[str, list[str]]]:
        out = []
        if self.cohort.encounter_classes is not None:
            out.append(("cohort.encounter_classes", self.cohort.encounter_classes))
        if isinstance(self.label, EncounterRule):
            out.append(("label.classes", self.label.classes))
        if isinstance(self.label, NextEncounterClassRule):
            for group, classes in self.label.classes.items():
                out.append((f"label.classes.{group}", classes))
        return out

    @property
    def task_token(self) -> str:
        return f"[TASK:{self.name}]"


def parse_task_spec(data: dict, source: str = "<dict>") -> TaskSpec:
    return parse_spec(TaskSpec, data, source, _RULE_TYPES)


def load_task_spec(path: Path | str) -> TaskSpec:
    """Read a task spec from YAML (.yaml/.yml) or TOML (.toml)."""
    return parse_task_spec(read_spec_file(path), str(path))
