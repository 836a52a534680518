"""Reading declarative task specs (YAML or TOML) into a vertical's pydantic model, with errors that name the field."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from kit.errors import KitError

M = TypeVar("M", bound=BaseModel)


def format_spec_error(source: str, exc: ValidationError, rule_types: Iterable[str]) -> str:
    """One line per problem, with the field path as the spec's author wrote it (no pydantic class or tag names)."""
    rule_types = tuple(rule_types)
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p[0].isupper() and "Rule" in p))
        loc = ".".join(p for p in loc.split(".") if p not in rule_types) if loc.startswith("label.") else loc
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown field `{loc}`")
        elif err["type"] == "missing":
            lines.append(f"missing field `{loc}`")
        elif err["type"] == "value_error":
            msg = str(err.get("ctx", {}).get("error", err["msg"]))
            lines.append(msg if msg.startswith("field `") else f"field `{loc}`: {msg}")
        elif err["type"] == "union_tag_invalid":
            lines.append(f"field `{loc}.rule`: unknown label rule; use one of {', '.join(rule_types)}")
        else:
            lines.append(f"field `{loc or '(top)'}`: {err['msg']}")
    return f"task spec {source}: " + "; ".join(lines)


def parse_spec(model: type[M], data: object, source: str, rule_types: Iterable[str]) -> M:
    if not isinstance(data, dict):
        raise KitError(f"task spec {source}: expected a mapping of fields, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise KitError(format_spec_error(source, exc, rule_types)) from None


def read_spec_file(path: Path | str) -> object:
    """The parsed YAML (.yaml/.yml) or TOML (.toml) content of a spec file."""
    path = Path(path)
    try:
        text = path.read_text()
        return tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except FileNotFoundError:
        raise KitError(f"task spec {path}: file not found") from None
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise KitError(f"task spec {path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'} ({exc})") from None


def select_specs(vertical: str, shipped: dict[str, M], names: list[str] | None, files: Iterable[str],
                 load: Callable[[str], M]) -> list[M]:
    """The shipped specs named (all when None and no files), then the user's spec files; names must be unique."""
    files = list(files)
    specs: list[M] = []
    if names is None:
        specs = list(shipped.values()) if not files else []
    else:
        for n in names:
            if n not in shipped:
                raise KitError(f"unknown {vertical} task '{n}'; available: {', '.join(shipped)}")
            specs.append(shipped[n])
    specs += [load(f) for f in files]
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise KitError(f"task '{s.name}' is listed twice; task names must be unique")
        seen.add(s.name)
    if not specs:
        raise KitError("no tasks selected")
    return specs
