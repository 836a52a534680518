"""Finance labelers: a task spec applied to the events of a chunk of subjects gives one row per sample.

Rows: subject_id, prediction_time, status ("ok", "censored", "excluded:<why>"), label (binary 0/1 or class index).
Labels read only `LABEL/` events (never inputs: the vertical drops them from the tokenizer) or events at or after
the prediction time; what counts as history is the tokenizer's business (strictly before the prediction time).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import polars as pl

from kit.datasets.tasks import TaskInfo
from verticals.finance.spec import LabelEventRule, LargeOutflowRule, NextCategoryRule, TaskSpec

TXN_PREFIX = "TXN/"
_US_PER_DAY = 86_400_000_000

OUT_SCHEMA = {
    "subject_id": pl.Int64,
    "prediction_time": pl.Datetime("us"),
    "status": pl.String,
    "label": pl.Float32,
}


def _days(d: float) -> pl.Expr:
    return pl.duration(microseconds=int(d * _US_PER_DAY))


def transactions(events: pl.DataFrame, exclude_source_types: list[str] = ()) -> pl.DataFrame:
    """Timed `TXN/` events in store order: subject_id, time, code, numeric_value, unit, source_type, source_id, _i."""
    tx = events.with_row_index("_i").filter(pl.col("code").str.starts_with(TXN_PREFIX) & pl.col("time").is_not_null())
    if exclude_source_types:
        tx = tx.filter(~pl.col("source_type").is_in(list(exclude_source_types)))
    return tx.select("subject_id", "time", "code", "numeric_value", "unit", "source_type", "source_id", "_i")


def categories(events: pl.DataFrame, tx: pl.DataFrame, prefixes: list[str]) -> pl.DataFrame:
    """Each transaction with its `category`: the code of the first prefix it has an event for (same subject, time and
    source record); a `TXN/` prefix means the transaction's own type."""
    out = tx.with_columns(pl.lit(None, dtype=pl.String).alias("category"))
    for prefix in reversed(prefixes):
        if prefix == TXN_PREFIX:
            cand = tx.select("_i", pl.col("code").alias("_c"))
        else:
            side = (
                events.filter(pl.col("code").str.starts_with(prefix) & pl.col("time").is_not_null())
                .group_by("subject_id", "time", "source_id")
                .agg(pl.col("code").first().alias("_c"))
            )
            cand = tx.join(side, on=["subject_id", "time", "source_id"], how="inner").select("_i", "_c")
        out = out.join(cand, on="_i", how="left").with_columns(
            pl.coalesce("_c", "category").alias("category")).drop("_c")
    return out


def _evenly_spaced(df: pl.DataFrame, k: int) -> pl.DataFrame:
    """At most k rows per subject, spread evenly over time (deterministic)."""
    return (
        df.sort("subject_id", "prediction_time")
        .with_columns(pl.len().over("subject_id").alias("_n"), pl.int_range(pl.len()).over("subject_id").alias("_k"))
        .filter((pl.col("_k") == 0) | ((pl.col("_k") * k) // pl.col("_n") != ((pl.col("_k") - 1) * k) // pl.col("_n")))
        .drop("_n", "_k")
    )


def _history_counts(samples: pl.DataFrame, tx: pl.DataFrame) -> pl.DataFrame:
    """`_hist`: the subject's transactions strictly before each sample's prediction time."""
    counted = tx.sort("subject_id", "time").with_columns(pl.int_range(1, pl.len() + 1).over("subject_id").alias("_hist"))
    return (
        samples.with_row_index("_r")
        .sort("prediction_time")
        .join_asof(counted.select("subject_id", "time", "_hist").sort("time"), left_on="prediction_time",
                   right_on="time", by="subject_id", strategy="backward", allow_exact_matches=False,
                   check_sortedness=False)
        .sort("_r")
        .drop("_r", "time")
        .with_columns(pl.col("_hist").fill_null(0))
    )


@dataclass
class FinanceTask:
    """A task spec plus what was fit on the train split (next_category classes, large_outflow thresholds, the end of
    each source's data)."""

    spec: TaskSpec
    classes: list[str] | None = None
    category_codes: list[str] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)  # currency -> outflow size
    source_end: dict[str, datetime] = field(default_factory=dict)  # source_type -> end of its data (exclusive)

    @property
    def info(self) -> TaskInfo:
        s = self.spec
        return TaskInfo(
            name=s.name, type=s.type, metric=s.metric, description=s.description, prompt=s.prompt,
            classes=self.classes, sample_weight=s.sample_weight,
            spec={**s.model_dump(mode="json"), "fitted": self.fitted()},
            baselines=tuple(s.baselines),
        )

    def fitted(self) -> dict:
        return {"category_codes": self.category_codes or None, "thresholds": self.thresholds or None,
                "source_end": {k: v.isoformat() for k, v in self.source_end.items()} or None}

    # ---- labeling -----------------------------------------------------------------------------------------
    def label(self, events: pl.DataFrame, subjects: pl.DataFrame, shared: dict | None = None) -> pl.DataFrame:
        rule = self.spec.label
        if isinstance(rule, LabelEventRule):
            out = self._label_event(events, rule)
        elif isinstance(rule, NextCategoryRule):
            out = self._next_category(events, rule)
        else:
            out = self._large_outflow(events, rule)
        out = out.select([pl.col(c).cast(t) for c, t in OUT_SCHEMA.items()])
        k = self.spec.cohort.max_samples_per_subject
        if k is not None and out.height:
            out = out.with_row_index("_o")
            keep = _evenly_spaced(out.filter(pl.col("status") == "ok"), k).get_column("_o")
            capped = (pl.col("status") == "ok") & ~pl.col("_o").is_in(keep.implode())
            out = out.with_columns(
                pl.when(capped).then(pl.lit("excluded:per_subject_cap")).otherwise(pl.col("status")).alias("status")
            ).drop("_o")
        return out.sort("subject_id", "prediction_time", "status", maintain_order=True)

    def _label_event(self, events: pl.DataFrame, rule: LabelEventRule) -> pl.DataFrame:
        pt_spec = self.spec.prediction_time
        lab = events.filter(pl.col("code") == rule.code).unique("subject_id", keep="first", maintain_order=True)
        if pt_spec.at == "fixed":
            pt = pl.lit(pt_spec.date, dtype=pl.Datetime("us"))
        else:
            pt = pl.col("time") + _days(pt_spec.offset_days)
        lab = lab.with_columns(pt.alias("prediction_time"))
        if rule.classes:
            index = {raw: i for i, values in enumerate(rule.classes.values()) for raw in values}
            y = pl.col("text_value").str.strip_chars().replace_strict(index, default=None, return_dtype=pl.Float32)
        else:
            y = pl.col("numeric_value")
        lab = lab.with_columns(y.cast(pl.Float32).alias("label"))
        status = (
            pl.when(pl.col("prediction_time").is_null()).then(pl.lit("excluded:no_label_time"))
            .when(pl.col("label").is_null()).then(pl.lit("excluded:unknown_label_value"))
            .otherwise(pl.lit("ok"))
        )
        return lab.with_columns(status.alias("status"))

    def _next_category(self, events: pl.DataFrame, rule: NextCategoryRule) -> pl.DataFrame:
        tx = categories(events, transactions(events, self.spec.cohort.exclude_source_types), rule.category_prefixes)
        # One sample per distinct transaction time: the first transaction then (store order) is the target.
        first = tx.sort("subject_id", "time", "_i").unique(["subject_id", "time"], keep="first", maintain_order=True)
        index = {c: i for i, c in enumerate(self.category_codes)}
        other = len(index) if self.classes and len(self.classes) > len(index) else None
        samples = first.select(
            "subject_id", pl.col("time").alias("prediction_time"),
            pl.col("category").replace_strict(index, default=other, return_dtype=pl.Int32).cast(pl.Float32).alias("label"),
        )
        samples = _history_counts(samples, tx)
        status = (
            pl.when(pl.col("_hist") < max(self.spec.cohort.min_history, 1)).then(pl.lit("excluded:no_history"))
            .when(pl.col("label").is_null()).then(pl.lit("excluded:other_category"))
            .otherwise(pl.lit("ok"))
        )
        return samples.with_columns(status.alias("status"))

    def _large_outflow(self, events: pl.DataFrame, rule: LargeOutflowRule) -> pl.DataFrame:
        s = self.spec
        tx = transactions(events, s.cohort.exclude_source_types)
        horizon_us = int(s.horizon.days * _US_PER_DAY)
        ends = pl.DataFrame({"source_type": list(self.source_end), "_end": list(self.source_end.values())},
                            schema={"source_type": pl.String, "_end": pl.Datetime("us")})
        per_subject = (
            tx.group_by("subject_id")
            .agg(pl.col("time").min().alias("_first"), pl.col("time").max().alias("_last"),
                 pl.col("source_type").first())
            .join(ends, on="source_type", how="left")
        )
        if s.prediction_time.at == "periodic":
            step = int(s.prediction_time.every_days * _US_PER_DAY)
            # Only times whose whole window lies before the end of the subject's data source (its last transaction
            # when the source end is unknown): a late window would keep its positives and lose its negatives.
            last = pl.coalesce("_end", "_last").dt.epoch("us") - horizon_us
            samples = (
                per_subject.with_columns(
                    pl.int_ranges(pl.col("_first").dt.epoch("us") + step, last + 1, step).alias("_t"))
                .explode("_t")
                .drop_nulls("_t")
                .select("subject_id", pl.col("_t").cast(pl.Datetime("us")).alias("prediction_time"), "_end")
            )
        else:
            samples = (
                tx.select("subject_id", pl.col("time").alias("prediction_time")).unique(maintain_order=True)
                .join(per_subject.select("subject_id", "_end"), on="subject_id", how="left")
            )
        samples = samples.with_columns((pl.col("prediction_time") + pl.duration(microseconds=horizon_us)).alias("_wend"))
        thresholds = pl.DataFrame({"unit": list(self.thresholds), "_thr": list(self.thresholds.values())},
                                  schema={"unit": pl.String, "_thr": pl.Float64})
        large = (
            tx.filter(pl.col("numeric_value") < 0)
            .join(thresholds, on="unit", how="left")
            .with_columns(pl.coalesce(pl.lit(rule.min_amount, dtype=pl.Float64), "_thr").alias("_thr"))
            .filter(pl.col("_thr").is_not_null() & (-pl.col("numeric_value").cast(pl.Float64) >= pl.col("_thr")))
            .select("subject_id", pl.col("time").alias("_lt"))
        )
        hits = (
            samples.with_row_index("_r")
            .join(large, on="subject_id", how="inner")
            .filter((pl.col("_lt") >= pl.col("prediction_time")) & (pl.col("_lt") < pl.col("_wend")))
            .select("_r").unique()
            .with_columns(pl.lit(1.0, dtype=pl.Float32).alias("label"))
        )
        samples = (
            samples.with_row_index("_r")
            .join(hits, on="_r", how="left", maintain_order="left")
            .drop("_r")
            .with_columns(pl.col("label").fill_null(0.0))
        )
        samples = _history_counts(samples, tx)
        censored = pl.lit(s.censoring.rule == "follow_up") & (pl.col("label") == 0) & (
            pl.col("_end").is_null() | (pl.col("_wend") > pl.col("_end")))
        status = (
            pl.when(pl.col("_hist") < s.cohort.min_history).then(pl.lit("excluded:no_history"))
            .when(censored).then(pl.lit("censored"))
            .otherwise(pl.lit("ok"))
        )
        return samples.with_columns(status.alias("status"))


# ---- fit on the train split ---------------------------------------------------------------------------------
def choose_categories(train_events: pl.LazyFrame, spec: TaskSpec) -> pl.DataFrame:
    """category, n, chosen: the categories of the train split's transactions, most frequent first; `chosen` marks
    the task's classes."""
    rule = spec.label
    assert isinstance(rule, NextCategoryRule)
    wanted = [p for p in rule.category_prefixes if p != TXN_PREFIX] + [TXN_PREFIX]
    ev = train_events.filter(
        pl.any_horizontal([pl.col("code").str.starts_with(p) for p in wanted]) & pl.col("time").is_not_null()
    ).collect()
    tx = categories(ev, transactions(ev, spec.cohort.exclude_source_types), rule.category_prefixes)
    table = tx.group_by(pl.col("category")).agg(pl.len().alias("n")).drop_nulls("category")
    table = table.sort(["n", "category"], descending=[True, False])
    if rule.codes is not None:
        return table.with_columns(pl.col("category").is_in(rule.codes).alias("chosen"))
    rank = pl.int_range(pl.len())
    return table.with_columns(((pl.col("n") >= rule.min_count) & (rank < rule.top_k)).alias("chosen"))


def outflow_thresholds(train_events: pl.LazyFrame, spec: TaskSpec) -> dict[str, float]:
    """Per currency: the `quantile` of outflow sizes on the train split."""
    rule = spec.label
    assert isinstance(rule, LargeOutflowRule)
    if rule.quantile is None:
        return {}
    q = (
        train_events.filter(pl.col("code").str.starts_with(TXN_PREFIX) & pl.col("time").is_not_null()
                            & (pl.col("numeric_value") < 0) & pl.col("unit").is_not_null())
        .filter(~pl.col("source_type").is_in(spec.cohort.exclude_source_types))
        .group_by("unit")
        .agg((-pl.col("numeric_value").cast(pl.Float64)).quantile(rule.quantile, "linear").alias("q"))
        .sort("unit")
        .collect()
    )
    return dict(q.iter_rows())


def source_ends(train_events: pl.LazyFrame) -> dict[str, datetime]:
    """Per source type: the day after its latest transaction (the source's data is complete up to then)."""
    t = (
        train_events.filter(pl.col("code").str.starts_with(TXN_PREFIX) & pl.col("time").is_not_null())
        .group_by("source_type")
        .agg((pl.col("time").max().dt.truncate("1d") + pl.duration(days=1)).alias("end"))
        .sort("source_type")
        .collect()
    )
    return dict(t.iter_rows())
