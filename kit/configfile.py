"""Configs as pydantic models loaded from YAML, then `key.path=value` overrides (each value parsed as YAML)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from kit.errors import KitError

M = TypeVar("M", bound=BaseModel)


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise KitError(f"--set {dotted}: `{k}` is not a section")
    node[keys[-1]] = value


def load_model_config(model: type[M], path: Path | str | None = None, overrides: list[str] = (), *, example: str) -> M:
    """Validate defaults <- YAML file <- overrides into `model`; errors name the source and the field."""
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
            raise KitError(f"--set {item}: expected key.path=value, e.g. {example}")
        key, raw = item.split("=", 1)
        set_path(data, key.strip(), yaml.safe_load(raw))
    try:
        return model.model_validate(data)
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
