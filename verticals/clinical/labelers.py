"""Labelers: a task spec applied to the events of a chunk of subjects gives one row per cohort sample.

Each row has subject_id, prediction_time, status and the label columns. `status` says what happened to it:
"ok" (kept), "censored" (follow-up ended before the window closed without the outcome), or "excluded:<why>".
Labels read only events after the prediction time; what counts as history is the tokenizer's business
(strictly before the prediction time).

Follow-up ends at death when death is recorded; otherwise at the subject's last recorded event ("last_event",
the default), at the last event of the whole event store ("dataset_end", i.e. the export date: right for a
complete registry such as Synthea, optimistic for an EHR that only sees patients when they come), or at a fixed date.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import polars as pl

from kit.datasets.tasks import TaskInfo
from kit.events import DEATH_CODE
from verticals.clinical.spec import (
    DeathRule,
    EncounterRule,
    LengthOfStayRule,
    NewConditionRule,
    NextEncounterClassRule,
    NextEventsRule,
    TaskSpec,
)

ENCOUNTER_CODE = r"^ENCOUNTER/([A-Z_]+)/(START|END)$"
RESOLVED_PREFIX = "RESOLVED/"
CONDITION_SOURCE = "Condition"

OUT_SCHEMA = {
    "subject_id": pl.Int64,
    "prediction_time": pl.Datetime("us"),
    "status": pl.String,
    "label": pl.Float32,
    "labels": pl.List(pl.Float32),
    "label_mask": pl.List(pl.Float32),
}


@dataclass(frozen=True)
class FollowUp:
    rule: str = "last_event"  # last_event | dataset_end | fixed
    dataset_end: datetime | None = None
    fixed_date: datetime | None = None


def encounters(events: pl.DataFrame) -> pl.DataFrame:
    """One row per encounter: subject_id, encounter_id, class, start, end (null when not recorded)."""
    e = events.filter(pl.col("code").str.starts_with("ENCOUNTER/"))
    e = e.filter(pl.col("code").str.contains(ENCOUNTER_CODE)).with_columns(
        pl.col("code").str.extract(ENCOUNTER_CODE, 1).alias("class"),
        pl.col("code").str.extract(ENCOUNTER_CODE, 2).alias("_kind"),
    )
    return (
        e.group_by("subject_id", "encounter_id")
        .agg(
            pl.col("class").first(),
            pl.col("time").filter(pl.col("_kind") == "START").min().alias("start"),
            pl.col("time").filter(pl.col("_kind") == "END").max().alias("end"),
        )
        .filter(pl.col("start").is_not_null())
        .sort("subject_id", "start", "encounter_id")
    )


def subject_facts(events: pl.DataFrame, subjects: pl.DataFrame, follow_up: FollowUp) -> pl.DataFrame:
    """Per subject: birth_time, death_time (subjects table or MEDS_DEATH event) and follow_up_end."""
    death_ev = events.filter(pl.col("code") == DEATH_CODE).group_by("subject_id").agg(pl.col("time").min().alias("_d"))
    last = events.filter(pl.col("time").is_not_null()).group_by("subject_id").agg(pl.col("time").max().alias("_last"))
    s = (
        subjects.select("subject_id", "birth_time", "death_time")
        .join(death_ev, on="subject_id", how="left")
        .join(last, on="subject_id", how="left")
        .with_columns(pl.coalesce("death_time", "_d").alias("death_time"))
    )
    if follow_up.rule == "dataset_end":
        alive_end = pl.lit(follow_up.dataset_end, dtype=pl.Datetime("us"))
    elif follow_up.rule == "fixed":
        alive_end = pl.lit(follow_up.fixed_date, dtype=pl.Datetime("us"))
    else:
        alive_end = pl.col("_last")
    return s.with_columns(pl.coalesce("death_time", alive_end).alias("follow_up_end")).drop("_d", "_last")


def _evenly_spaced(df: pl.DataFrame, k: int) -> pl.DataFrame:
    """At most k rows per subject, spread evenly over time (deterministic, no randomness)."""
    return (
        df.sort("subject_id", "prediction_time", "_r")
        .with_columns(pl.len().over("subject_id").alias("_n"), pl.int_range(pl.len()).over("subject_id").alias("_i"))
        .filter((pl.col("_i") == 0) | ((pl.col("_i") * k) // pl.col("_n") != ((pl.col("_i") - 1) * k) // pl.col("_n")))
        .drop("_n", "_i")
    )


@dataclass
class ClinicalTask:
    """A task spec plus what was fit on the train split (the condition codes of `new_condition`)."""

    spec: TaskSpec
    follow_up: FollowUp
    classes: list[str] | None = None
    class_descriptions: list[str] | None = None
    condition_codes: list[str] = field(default_factory=list)

    @property
    def info(self) -> TaskInfo:
        s = self.spec
        return TaskInfo(
            name=s.name,
            type=s.type,
            metric=s.metric,
            description=s.description,
            prompt=s.prompt,
            classes=self.classes,
            class_descriptions=self.class_descriptions,
            sample_weight=s.sample_weight,
            forecast_events=s.label.n_events if isinstance(s.label, NextEventsRule) else None,
            spec=s.model_dump(mode="json"),
        )

    # ---- labeling -----------------------------------------------------------------------------------------
    def label(self, events: pl.DataFrame, subjects: pl.DataFrame, shared: dict | None = None) -> pl.DataFrame:
        """Label one chunk of subjects; `shared` is a per-chunk cache the chunk's tasks share."""
        s = self.spec
        shared = {} if shared is None else shared
        if "encounters" not in shared:
            shared["encounters"] = encounters(events)
        key = ("facts", self.follow_up)
        if key not in shared:
            shared[key] = subject_facts(events, subjects, self.follow_up)
        enc, facts = shared["encounters"], shared[key]
        cohort = enc
        if s.cohort.encounter_classes is not None:
            cohort = cohort.filter(pl.col("class").is_in(s.cohort.encounter_classes))
        anchor = pl.col("start") if s.prediction_time.at == "encounter_start" else pl.col("end")
        pt = anchor + pl.duration(microseconds=int(s.prediction_time.offset_hours * 3600 * 1e6))
        cohort = cohort.with_columns(pt.alias("prediction_time")).join(facts, on="subject_id", how="left")
        if s.horizon.until == "encounter_end":
            wend = pl.col("end")
        elif s.horizon.days is not None:
            wend = pl.col("prediction_time") + pl.duration(microseconds=int(s.horizon.days * 86400 * 1e6))
        else:
            wend = pl.lit(None, dtype=pl.Datetime("us"))
        cohort = cohort.with_columns(wend.alias("window_end"))
        age = (pl.col("prediction_time") - pl.col("birth_time")).dt.total_days() / 365.25
        status = pl.when(pl.col("end").is_null() & pl.lit(s.cohort.require_end)).then(pl.lit("excluded:no_end_recorded"))
        status = status.when(pl.col("prediction_time").is_null()).then(pl.lit("excluded:no_prediction_time"))
        status = status.when(pl.col("death_time") <= pl.col("prediction_time")).then(pl.lit("excluded:dead_at_prediction"))
        if s.prediction_time.offset_hours > 0:
            status = status.when(pl.col("end") <= pl.col("prediction_time")).then(pl.lit("excluded:ended_before_prediction"))
        if s.cohort.min_age_years is not None:
            status = status.when(age < s.cohort.min_age_years).then(pl.lit("excluded:age"))
        if s.cohort.max_age_years is not None:
            status = status.when(age > s.cohort.max_age_years).then(pl.lit("excluded:age"))
        cohort = cohort.with_columns(status.otherwise(pl.lit("ok")).alias("status"))

        rule = s.label
        if isinstance(rule, DeathRule):
            out = self._death(cohort)
        elif isinstance(rule, EncounterRule):
            out = self._encounter(cohort, enc, rule)
        elif isinstance(rule, LengthOfStayRule):
            out = self._length_of_stay(cohort, rule)
        elif isinstance(rule, NextEncounterClassRule):
            out = self._next_class(cohort, enc, rule)
        elif isinstance(rule, NewConditionRule):
            out = self._new_condition(cohort, events, shared)
        else:
            out = cohort.with_columns(pl.lit(None, dtype=pl.Float32).alias("label"))
        out = self._censor(out)
        for col, dtype in OUT_SCHEMA.items():
            if col not in out.columns:
                out = out.with_columns(pl.lit(None, dtype=dtype).alias(col))
        out = out.select([pl.col(c).cast(t) for c, t in OUT_SCHEMA.items()])
        if s.cohort.max_samples_per_subject is not None:
            out = out.with_row_index("_r")
            keep = _evenly_spaced(out.filter(pl.col("status") == "ok"), s.cohort.max_samples_per_subject)
            capped = (pl.col("status") == "ok") & ~pl.col("_r").is_in(keep.get_column("_r").implode())
            out = out.with_columns(
                pl.when(capped).then(pl.lit("excluded:per_subject_cap")).otherwise(pl.col("status")).alias("status")
            ).drop("_r")
        return out.sort("subject_id", "prediction_time", "status", maintain_order=True)

    def _censor(self, df: pl.DataFrame) -> pl.DataFrame:
        """Mark as censored the ok samples whose outcome is unknown: follow-up ended before the window end."""
        if self.spec.censoring.rule == "none" or "window_end" not in df.columns:
            return df
        unknown = (
            (pl.col("status") == "ok")
            & ~pl.col("_outcome").fill_null(False)
            & pl.col("window_end").is_not_null()
            & (pl.col("follow_up_end").is_null() | (pl.col("follow_up_end") < pl.col("window_end")))
        )
        if "_outcome" not in df.columns:
            return df
        return df.with_columns(pl.when(unknown).then(pl.lit("censored")).otherwise(pl.col("status")).alias("status"))

    def _death(self, c: pl.DataFrame) -> pl.DataFrame:
        died = (pl.col("death_time") > pl.col("prediction_time")) & (pl.col("death_time") <= pl.col("window_end"))
        return c.with_columns(died.fill_null(False).alias("_outcome")).with_columns(
            pl.col("_outcome").cast(pl.Float32).alias("label")
        )

    def _first_after(self, c: pl.DataFrame, enc: pl.DataFrame, classes: list[str]) -> pl.DataFrame:
        """The first encounter of `classes` starting strictly after each sample's prediction time.

        Encounters starting at the same instant (Synthea opens an emergency and an inpatient encounter together)
        resolve to the class listed first in `classes`, then the encounter id, so the answer never depends on order.
        """
        priority = {cls: i for i, cls in enumerate(classes)}
        later = (
            enc.filter(pl.col("class").is_in(classes))
            .select(
                "subject_id", pl.col("start").alias("_next_start"), pl.col("class").alias("_next_class"),
                pl.col("encounter_id").alias("_next_id"),
                pl.col("class").replace_strict(priority, return_dtype=pl.Int32).alias("_prio"),
            )
            .sort("subject_id", "_next_start", "_prio", "_next_id")
            .unique(subset=["subject_id", "_next_start"], keep="first", maintain_order=True)
            .drop("_prio")
            .sort("_next_start")
        )
        return (
            c.with_row_index("_r")
            .sort("prediction_time")
            .join_asof(
                later, left_on="prediction_time", right_on="_next_start", by="subject_id",
                strategy="forward", allow_exact_matches=False, check_sortedness=False,
            )
            .sort("_r")
            .drop("_r")
        )

    def _encounter(self, c: pl.DataFrame, enc: pl.DataFrame, rule: EncounterRule) -> pl.DataFrame:
        c = self._first_after(c, enc, rule.classes)
        hit = pl.col("_next_start").is_not_null() & (pl.col("_next_start") <= pl.col("window_end"))
        # A readmission recorded after death is a data error, not an outcome.
        hit = hit & (pl.col("death_time").is_null() | (pl.col("_next_start") <= pl.col("death_time")))
        return c.with_columns(hit.alias("_outcome")).with_columns(pl.col("_outcome").cast(pl.Float32).alias("label"))

    def _length_of_stay(self, c: pl.DataFrame, rule: LengthOfStayRule) -> pl.DataFrame:
        los_days = (pl.col("end") - pl.col("start")).dt.total_seconds() / 86400.0
        c = c.with_columns(
            pl.when(pl.col("end").is_null() & (pl.col("status") == "ok"))
            .then(pl.lit("censored"))
            .otherwise(pl.col("status"))
            .alias("status")
        )
        label = los_days if self.spec.type == "regression" else (los_days > rule.min_days).cast(pl.Float32)
        return c.with_columns(label.cast(pl.Float32).alias("label"))

    def _next_class(self, c: pl.DataFrame, enc: pl.DataFrame, rule: NextEncounterClassRule) -> pl.DataFrame:
        groups = list(rule.classes)
        member = {cls: i for i, g in enumerate(groups) for cls in rule.classes[g]}
        c = self._first_after(c, enc, [cls for g in groups for cls in rule.classes[g]])
        in_window = (
            pl.col("_next_start").is_not_null()
            & (pl.col("_next_start") <= pl.col("window_end"))
            & (pl.col("death_time").is_null() | (pl.col("_next_start") <= pl.col("death_time")))
        )
        idx = pl.col("_next_class").replace_strict(member, default=None, return_dtype=pl.Int32)
        none_idx = len(groups) if rule.none_class is not None else None
        c = c.with_columns(in_window.alias("_outcome"))
        if none_idx is None:
            # Without a "none" class, a sample with no next encounter has no label.
            c = c.with_columns(
                pl.when(~pl.col("_outcome") & (pl.col("status") == "ok"))
                .then(pl.lit("excluded:no_next_encounter"))
                .otherwise(pl.col("status"))
                .alias("status")
            )
        return c.with_columns(
            pl.when(pl.col("_outcome")).then(idx).otherwise(pl.lit(none_idx, dtype=pl.Int32)).cast(pl.Float32).alias("label")
        )

    def _new_condition(self, c: pl.DataFrame, events: pl.DataFrame, shared: dict) -> pl.DataFrame:
        codes = self.condition_codes
        if "condition_onsets" not in shared:
            shared["condition_onsets"] = (
                events.filter((pl.col("source_type") == CONDITION_SOURCE) & pl.col("time").is_not_null())
                .filter(~pl.col("code").str.starts_with(RESOLVED_PREFIX))
                .group_by("subject_id", "code")
                .agg(pl.col("time").min().alias("onset"))
            )
        onsets = shared["condition_onsets"].filter(pl.col("code").is_in(codes))
        c = c.with_row_index("_r")
        pairs = c.select("_r", "subject_id", "prediction_time", "window_end").join(
            pl.DataFrame({"code": codes, "_j": list(range(len(codes)))}, schema={"code": pl.String, "_j": pl.Int32}),
            how="cross",
        )
        pairs = pairs.join(onsets, on=["subject_id", "code"], how="left").with_columns(
            ((pl.col("onset") > pl.col("prediction_time")) & (pl.col("onset") <= pl.col("window_end")))
            .fill_null(False)
            .cast(pl.Float32)
            .alias("_y"),
            (pl.col("onset").is_null() | (pl.col("onset") > pl.col("prediction_time"))).cast(pl.Float32).alias("_m"),
        )
        vec = pairs.sort("_r", "_j").group_by("_r", maintain_order=True).agg(
            pl.col("_y").alias("labels"), pl.col("_m").alias("label_mask")
        )
        # Censoring for a multilabel task: any unseen part of the window makes every zero uncertain, so the
        # whole sample is excluded when follow-up ends early (a death does not settle a diagnosis either).
        return (
            c.join(vec, on="_r", how="left", maintain_order="left")
            .drop("_r")
            .with_columns(pl.lit(False).alias("_outcome"))
        )


def choose_condition_codes(train_events: pl.LazyFrame, rule: NewConditionRule) -> pl.DataFrame:
    """The chronic conditions of a new_condition task, from the train split: code, n_subjects, resolved_fraction."""
    cond = train_events.filter(pl.col("source_type") == CONDITION_SOURCE)
    onsets = (
        cond.filter(~pl.col("code").str.starts_with(RESOLVED_PREFIX))
        .group_by("code")
        .agg(pl.col("subject_id").n_unique().alias("n_subjects"), pl.len().alias("n_onsets"))
    )
    resolved = (
        cond.filter(pl.col("code").str.starts_with(RESOLVED_PREFIX))
        .with_columns(pl.col("code").str.strip_prefix(RESOLVED_PREFIX))
        .group_by("code")
        .agg(pl.len().alias("n_resolved"))
    )
    table = (
        onsets.join(resolved, on="code", how="left")
        .with_columns((pl.col("n_resolved").fill_null(0) / pl.col("n_onsets")).alias("resolved_fraction"))
        .collect()
    )
    if rule.codes is not None:
        return table.filter(pl.col("code").is_in(rule.codes)).sort("code")
    return (
        table.filter(
            (pl.col("resolved_fraction") <= rule.max_resolved_fraction)
            & (pl.col("n_onsets") / pl.col("n_subjects") <= rule.max_onsets_per_subject)
            & (pl.col("n_subjects") >= rule.min_subjects)
            & ~pl.col("code").is_in(rule.exclude_codes)
        )
        .sort(["n_subjects", "code"], descending=[True, False])
        .head(rule.top_k)
    )


def end_of_data(events: pl.LazyFrame) -> datetime | None:
    return events.select(pl.col("time").max()).collect().item()

