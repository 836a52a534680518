"""`kit dataset build` configuration: a pydantic model loaded from YAML with `--set key.path=value` overrides."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kit.configfile import load_model_config
from kit.datasets.mixing import MixingConfig
from kit.datasets.splits import SplitConfig
from kit.tokenizer import TokenizerConfig


class FollowUpConfig(BaseModel):
    """When a living subject's follow-up ends (a recorded death always ends it)."""

    model_config = ConfigDict(extra="forbid")

    rule: Literal["last_event", "dataset_end", "fixed"] = "last_event"
    date: datetime | None = Field(None, description="The end of follow-up for rule `fixed` (e.g. the export date).")

    @model_validator(mode="after")
    def _date(self) -> FollowUpConfig:
        if self.rule == "fixed" and self.date is None:
            raise ValueError("field `follow_up.date`: rule `fixed` needs a date")
        return self


class DatasetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: list[str] | None = Field(None, description="Task names of the vertical to build (default: all).")
    task_files: list[str] = Field(default_factory=list, description="Extra task spec files (YAML/TOML).")
    splits: SplitConfig = Field(default_factory=SplitConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    mixing: MixingConfig = Field(default_factory=MixingConfig)
    follow_up: FollowUpConfig = Field(default_factory=FollowUpConfig)
    subjects_per_chunk: int = Field(1000, ge=1, description="Subjects labeled and tokenized together (memory bound).")
    min_cohort_warning: int = Field(20, ge=0, description="Warn when a task keeps fewer samples than this.")


def load_config(path: Path | None = None, overrides: list[str] = ()) -> DatasetConfig:
    """Config from an optional YAML file, then `key.path=value` overrides (values parsed as YAML)."""
    return load_model_config(DatasetConfig, path, overrides, example="tokenizer.max_len=512")
