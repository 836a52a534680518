"""Deterministic subject splits: a subject's split depends only on its id and the salt, so every task (and every
rerun, and a later export) puts a subject in the same split, and no subject spans two."""

from __future__ import annotations

import hashlib

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator

SPLITS = ("train", "val", "test")


class SplitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train: float = Field(0.8, ge=0, le=1)
    val: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.1, ge=0, le=1)
    salt: str = Field("kit-split-v1", description="Change it to draw a different (still deterministic) split.")

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"field `splits`: train + val + test must be 1, got {total:g}")
        if self.train <= 0:
            raise ValueError("field `splits.train`: must be above 0 (tokenizer and tasks are fit on it)")
        return self


def subject_fraction(subject_id: int, salt: str) -> float:
    """A uniform number in [0, 1) from a subject id: the first 8 bytes of sha256(salt:id)."""
    digest = hashlib.sha256(f"{salt}:{subject_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(subject_id: int, config: SplitConfig) -> str:
    u = subject_fraction(subject_id, config.salt)
    if u < config.train:
        return "train"
    if u < config.train + config.val:
        return "val"
    return "test"


def assign_splits(subject_ids: pl.Series | list[int], config: SplitConfig) -> pl.DataFrame:
    ids = list(subject_ids)
    return pl.DataFrame(
        {"subject_id": ids, "split": [split_of(int(s), config) for s in ids]},
        schema={"subject_id": pl.Int64, "split": pl.String},
    )
