"""`kit dataset build` configuration: a pydantic model loaded from YAML with `--set key.path=value` overrides."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kit.datasets.mixing import MixingConfig
from kit.datasets.splits import SplitConfig
from kit.errors import KitError
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


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise KitError(f"--set {dotted}: `{k}` is not a section")
    node[keys[-1]] = value


def load_config(path: Path | None = None, overrides: list[str] = ()) -> DatasetConfig:
    """Config from an optional YAML file, then `key.path=value` overrides (values parsed as YAML)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise KitError(f"config {path}: file not found") from None
        except yaml.YAMLError as exc:
            raise KitError(f"config {path}: not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise KitError(f"config {path}: expected a mapping of sections")
    for item in overrides:
        if "=" not in item:
            raise KitError(f"--set {item}: expected key.path=value, e.g. tokenizer.max_len=512")
        key, raw = item.split("=", 1)
        _set_path(data, key.strip(), yaml.safe_load(raw))
    try:
        return DatasetConfig.model_validate(data)
    except ValidationError as exc:
        msgs = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                msgs.append(f"unknown field `{loc}`")
            elif err["type"] == "value_error":
                msgs.append(str(err.get("ctx", {}).get("error", err["msg"])))
            else:
                msgs.append(f"field `{loc}`: {err['msg']}")
        source = " + ".join([str(path)] * (path is not None) + ["--set"] * bool(overrides)) or "(defaults)"
        raise KitError(f"config {source}: " + "; ".join(msgs)) from None
