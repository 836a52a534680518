"""Validation against fhir.resources' R4B models, and FHIR version detection.

The fast path calls `unknown_elements` (a set difference against the R4B element names) on every resource of a
type it maps, and only runs the pydantic models when something looks off. `--validate full` runs the models on
every resource. Reasons name fields and error kinds, never values, so quarantine files carry no patient data.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

SUPPORTED_VERSION = "R4"
# Element names of every R4B resource type, generated from fhir.resources by `build_r4_element_table` (a test
# checks it still matches). Importing the models costs seconds per process; the fast path only needs the names.
ELEMENT_TABLE = Path(__file__).with_name("r4_elements.json")
ABSTRACT_TYPES = frozenset({"Resource", "DomainResource"})


def build_r4_element_table(types: list[str] | None = None) -> dict[str, list[str]]:
    """resourceType -> sorted JSON element names, from the installed fhir.resources R4B models."""
    import importlib
    import pkgutil

    import fhir.resources.R4B as r4b
    from fhir.resources.R4B.resource import Resource

    table: dict[str, list[str]] = {}
    modules = [t.lower() for t in types] if types else [m.name for m in pkgutil.iter_modules(r4b.__path__)]
    for mod_name in modules:
        try:
            mod = importlib.import_module(f"fhir.resources.R4B.{mod_name}")
        except ImportError:
            continue
        for name, cls in vars(mod).items():
            if (
                isinstance(cls, type)
                and issubclass(cls, Resource)
                and cls.__module__ == mod.__name__
                and getattr(cls, "__resource_type__", None) == name
                and name not in ABSTRACT_TYPES
            ):
                table[name] = sorted(_element_names(cls))
    return dict(sorted(table.items()))


@cache
def element_table() -> dict[str, frozenset[str]]:
    """resourceType -> its R4 element names (JSON keys, with `_x` primitive extensions and resourceType)."""
    return {k: frozenset(v) for k, v in json.loads(ELEMENT_TABLE.read_text()).items()}


@cache
def _r4b_class(resource_type: str):
    from fhir.resources.R4B import get_fhir_model_class
    from fhir.resources.R4B.resource import Resource

    try:
        cls = get_fhir_model_class(resource_type)
    except (ValueError, KeyError, ImportError, AttributeError):
        return None
    return cls if isinstance(cls, type) and issubclass(cls, Resource) else None


@cache
def _other_class(version: str, resource_type: str):
    try:
        if version == "R5":
            from fhir.resources import get_fhir_model_class
            from fhir.resources.resource import Resource
        else:
            from fhir.resources.STU3 import get_fhir_model_class
            from fhir.resources.STU3.resource import Resource
        cls = get_fhir_model_class(resource_type)
    except (ValueError, KeyError, ImportError, AttributeError):
        return None
    return cls if isinstance(cls, type) and issubclass(cls, Resource) else None


def is_r4_resource_type(resource_type: object) -> bool:
    return isinstance(resource_type, str) and resource_type in element_table()


def _element_names(cls) -> frozenset[str]:
    names = {f.alias or n for n, f in cls.model_fields.items()}
    names.discard("fhir_comments")
    return frozenset(names | {"resourceType"})


def r4_elements(resource_type: str) -> frozenset[str]:
    return element_table()[resource_type]


@cache
def _other_elements(version: str, resource_type: str) -> frozenset[str]:
    cls = _other_class(version, resource_type)
    return _element_names(cls) if cls is not None else frozenset()


def unknown_elements(resource: dict, resource_type: str) -> list[str]:
    """Top-level keys that R4 does not define for this type (sorted, for stable reasons)."""
    extra = resource.keys() - r4_elements(resource_type)
    return sorted(extra) if extra else []


def _format_errors(exc, limit: int = 3) -> str:
    parts = []
    for err in exc.errors(include_input=False, include_url=False)[:limit]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "root") or "(resource)"
        kind = err.get("type", "invalid")
        parts.append(f"{loc}: {kind}")
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def detect_version(resource: dict) -> str | None:
    """'R5' or 'STU3' when a resource that is not valid R4 reads as that version instead; else None."""
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str):
        return None
    extra = resource.keys() - (r4_elements(rtype) if is_r4_resource_type(rtype) else frozenset({"resourceType"}))
    for version in ("R5", "STU3"):
        cls = _other_class(version, rtype)
        if cls is None:
            continue
        if not is_r4_resource_type(rtype):
            return version  # a resource type R4 does not have at all
        if extra and extra <= _other_elements(version, rtype):
            return version
        try:
            cls.model_validate(resource)
        except Exception:  # noqa: BLE001 - the models can raise anything on hostile input; it just isn't that version
            continue
        return version
    return None


def validation_error(resource: dict) -> str | None:
    """None if the resource is valid R4 (R4B models); else a reason naming fields, never values."""
    rtype = resource.get("resourceType")
    import pydantic  # only on this slow path: the fast path never pays for the import

    cls = _r4b_class(rtype) if isinstance(rtype, str) else None
    if cls is None:
        return f"resourceType {rtype!r} is not defined by FHIR R4" if isinstance(rtype, str) else "no resourceType"
    try:
        cls.model_validate(resource)
    except pydantic.ValidationError as exc:
        return f"invalid {rtype}: {_format_errors(exc)}"
    except Exception as exc:  # noqa: BLE001 - fhir.resources raises KeyError etc. on some malformed input
        return f"invalid {rtype}: model validation failed ({type(exc).__name__})"
    return None


def version_reason(resource: dict, base: str) -> str:
    """Prefix a rejection reason with the FHIR version found, when the resource reads as STU3 or R5."""
    version = detect_version(resource)
    if version is None:
        return base
    return f"unsupported FHIR version {version} (kit reads R4/R4B): {base}"
