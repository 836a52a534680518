"""Finding FHIR input files and streaming the records out of them.

Inputs: Bundle JSON (`.json`, `.json.gz`, any Bundle type), a single resource JSON, and Bulk Data NDJSON
(`.ndjson`, `.ndjson.gz`, `.jsonl`, one resource per line, split files like `Observation.001.ndjson`).
Bundles are read whole (a per-patient Bundle is small); NDJSON streams line by line, so file size does not bound
memory. Every record comes out as a `RawRecord`: a resource dict, or the reason it could not be read.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from kit.errors import KitError

JSON_SUFFIXES = (".json", ".json.gz")
NDJSON_SUFFIXES = (".ndjson", ".ndjson.gz", ".jsonl", ".jsonl.gz")
# A Bulk Data export directory also holds its export log; it has no resources.
EXPORT_LOG_NAMES = frozenset({"log.ndjson", "log.ndjson.gz"})
# An NDJSON line that holds a Bundle: its entries get positions line << ENTRY_BITS | entry.
ENTRY_BITS = 20
FILE_POSITION = -2  # a whole file that could not be read


@dataclass(frozen=True)
class InputFile:
    path: Path
    kind: str  # "json" or "ndjson"
    size: int  # bytes on disk

    @property
    def gzipped(self) -> bool:
        return self.path.name.endswith(".gz")


@dataclass
class Discovery:
    files: list[InputFile]
    skipped: list[tuple[Path, str]]  # files found in directories that are not FHIR input, with why


@dataclass(slots=True)
class RawRecord:
    position: int
    resource: object | None
    error: str | None = None
    refs: dict[str, str] | None = None  # the enclosing Bundle's fullUrl -> id map
    resource_id: str | None = None


def file_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(NDJSON_SUFFIXES):
        return "ndjson"
    if name.endswith(JSON_SUFFIXES):
        return "json"
    return None


def discover(paths: list[Path], exclude: Path | None = None) -> Discovery:
    """All input files under `paths`, recursively, in sorted path order (the order dedup ties follow).

    `exclude` (the output directory) is never read, so `--out` may sit inside an input directory.
    """
    found: dict[Path, InputFile] = {}
    skipped: list[tuple[Path, str]] = []
    excluded = exclude.resolve() if exclude is not None else None
    for root in paths:
        if not root.exists():
            raise KitError(f"{root}: no such file or directory")
        candidates = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in candidates:
            if excluded is not None and excluded in p.resolve().parents:
                continue
            rel_hidden = any(part.startswith(".") for part in p.relative_to(root).parts) if p != root else False
            if rel_hidden:
                continue
            kind = file_kind(p)
            if p.name.lower() in EXPORT_LOG_NAMES:
                skipped.append((p, "Bulk Data export log, holds no resources"))
                continue
            if kind is None:
                if p == root:
                    raise KitError(
                        f"{p}: not a FHIR input file",
                        hint="expected .json, .json.gz (Bundle or one resource) or .ndjson, .ndjson.gz (Bulk Data)",
                    )
                skipped.append((p, "not a .json/.ndjson file"))
                continue
            key = p.resolve()
            if key not in found:
                found[key] = InputFile(p, kind, p.stat().st_size)
    files = sorted(found.values(), key=lambda f: str(f.path))
    return Discovery(files, skipped)


def position_label(kind: str, position: int) -> str:
    if position == FILE_POSITION:
        return "file"
    if kind == "json":
        if position >= 1 << ENTRY_BITS:
            return f"entry {(position >> ENTRY_BITS) - 1} entry {position & ((1 << ENTRY_BITS) - 1)}"
        return "resource" if position < 0 else f"entry {position}"
    if position >= 1 << ENTRY_BITS:
        return f"line {position >> ENTRY_BITS} entry {position & ((1 << ENTRY_BITS) - 1)}"
    return f"line {position}"


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _read_error(exc: BaseException) -> str:
    if isinstance(exc, EOFError):
        return "truncated gzip stream (compressed file ended early)"
    if isinstance(exc, (gzip.BadGzipFile, zlib.error)):
        return "corrupt gzip data"
    return f"unreadable file ({type(exc).__name__})"


def _json_error(exc: orjson.JSONDecodeError, one_line: bool = False) -> str:
    # orjson's message gives the position only, never the content.
    where = f"column {exc.colno}" if one_line else f"line {exc.lineno} column {exc.colno}"
    return f"malformed JSON ({str(exc).split(':', 1)[0]} at {where})"


def _id_of(obj: object) -> str | None:
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, str) else None


def bundle_records(bundle: dict, base: int = 0, nested_ok: bool = True) -> Iterator[RawRecord]:
    """The entries of a Bundle, with the Bundle's fullUrl -> id map for reference resolution.

    A Bundle inside a top-level Bundle file (a collection of patient Bundles) is expanded too: its entries get
    positions (outer entry + 1) << ENTRY_BITS | inner entry. Deeper nesting is passed on as a Bundle resource.
    """
    entries = bundle.get("entry")
    if entries is None:
        return
    if not isinstance(entries, list):
        yield RawRecord(base, None, "Bundle.entry is not a list")
        return
    # One pass reads every entry's resource and id (the per-request hot path: a Patient's Bundle has hundreds).
    refs: dict[str, str] = {}
    found: list[tuple[object, str | None] | None] = []
    for e in entries:
        if not isinstance(e, dict) or "resource" not in e:
            found.append(None)
            continue
        r = e["resource"]
        rid = r.get("id") if isinstance(r, dict) else None
        if not isinstance(rid, str):
            rid = None
        elif isinstance(url := e.get("fullUrl"), str):
            refs[url] = rid
        found.append((r, rid))
    for i, hit in enumerate(found):
        if hit is None:
            # No resource: a transaction DELETE or a search outcome entry; nothing to ingest, but say so.
            why = "Bundle entry has no resource" if isinstance(entries[i], dict) else "Bundle entry is not an object"
            yield RawRecord(base + i, None, why)
            continue
        r, rid = hit
        if nested_ok and isinstance(r, dict) and r.get("resourceType") == "Bundle":
            yield from bundle_records(r, (i + 1) << ENTRY_BITS, nested_ok=False)
        else:
            yield RawRecord(base + i, r, None, refs, rid)


def iter_records(f: InputFile, nbytes: list[int] | None = None) -> Iterator[RawRecord]:
    """Every record of one input file, in order; unreadable parts come out as records with an error.

    `nbytes[0]` accumulates the JSON bytes read (decompressed), for throughput figures.
    """
    nbytes = nbytes if nbytes is not None else [0]
    if f.kind == "json":
        try:
            raw = f.path.read_bytes()
            if f.gzipped:
                raw = gzip.decompress(raw)  # one call: faster than streaming a file we read whole anyway
        except (OSError, EOFError, zlib.error) as exc:
            yield RawRecord(FILE_POSITION, None, _read_error(exc))
            return
        nbytes[0] += len(raw)
        try:
            doc = orjson.loads(raw.removeprefix(b"\xef\xbb\xbf"))
        except orjson.JSONDecodeError as exc:
            yield RawRecord(FILE_POSITION, None, _json_error(exc))
            return
        del raw
        if isinstance(doc, dict) and doc.get("resourceType") == "Bundle":
            yield from bundle_records(doc)
        else:
            yield RawRecord(-1, doc, resource_id=_id_of(doc))
        return

    yield from _ndjson_records(f, nbytes, 0, None, 0)


def _ndjson_records(
    f: InputFile, nbytes: list[int], start: int, end: int | None, lines_before: int
) -> Iterator[RawRecord]:
    """NDJSON lines that start in bytes [start, end) of the file (all of it when end is None).

    `lines_before` is the number of newlines in bytes [0, start), so positions stay true line numbers.
    """
    line_no = lines_before
    try:
        with _open(f.path) as fh:
            offset = start
            if start > 0:
                # A line belongs to the range it starts in: skip the tail of one that began before `start`.
                fh.seek(start - 1)
                if fh.read(1) != b"\n":
                    offset += len(fh.readline())
                    line_no += 1
            for line in fh:
                if end is not None and offset >= end:
                    break
                offset += len(line)
                line_no += 1
                nbytes[0] += len(line)
                if not line.strip():
                    continue
                try:
                    doc = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    yield RawRecord(line_no, None, _json_error(exc, one_line=True))
                    continue
                if isinstance(doc, dict) and doc.get("resourceType") == "Bundle":
                    yield from bundle_records(doc, line_no << ENTRY_BITS, nested_ok=False)
                else:
                    yield RawRecord(line_no, doc, resource_id=_id_of(doc))
    except (OSError, EOFError, zlib.error) as exc:
        yield RawRecord(line_no + 1, None, f"{_read_error(exc)}; lines from here on are unreadable")


def ndjson_ranges(f: InputFile, target: int) -> list[tuple[int, int | None, int]]:
    """Split a large plain NDJSON file into (start, end, newlines before start) ranges of about `target` bytes,
    so several processes can parse one big Bulk Data file. Gzipped files cannot be split and stay whole."""
    if f.kind != "ndjson" or f.gzipped or f.size <= target:
        return [(0, None, 0)]
    bounds = list(range(0, f.size, target))
    out, newlines, pos = [], 0, 0
    with open(f.path, "rb") as fh:
        for i, start in enumerate(bounds):
            while pos < start:  # count newlines up to `start` in 16 MB blocks (bytes.count runs at memory speed)
                block = fh.read(min(16 << 20, start - pos))
                if not block:
                    break
                newlines += block.count(b"\n")
                pos += len(block)
            end = bounds[i + 1] if i + 1 < len(bounds) else None
            out.append((start, end, newlines))
    return out


def read_range(f: InputFile, nbytes: list[int], start: int, end: int | None, lines_before: int):
    """Records of one range from `ndjson_ranges` (the whole file for (0, None, 0))."""
    if f.kind == "json":
        return iter_records(f, nbytes)
    return _ndjson_records(f, nbytes, start, end, lines_before)


def decompressed_size(f: InputFile) -> int:
    """Bytes of JSON text in a file (reads gzip through once; used for throughput figures)."""
    if not f.gzipped:
        return f.size
    n = 0
    with gzip.open(f.path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            n += len(chunk)
    return n
