"""Property tests: random corruptions of real records never crash the ingest, and every record is accounted for."""

from __future__ import annotations

import gzip
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.fhir.cli import run_ingest
from connectors.fhir.ingest import resource_events

REPO = Path(__file__).resolve().parents[1]
BUNDLE = min((REPO / "examples" / "data" / "fhir" / "synthea-bundles").glob("*.json.gz"), key=lambda p: p.stat().st_size)
BULK = REPO / "examples" / "data" / "fhir" / "bulk-ndjson"


def _pool() -> list[dict]:
    """One real record of every resource type in a shipped bundle and in the Bulk Data set."""
    seen: dict[str, dict] = {}
    for e in orjson.loads(gzip.open(BUNDLE).read())["entry"]:
        r = e["resource"]
        if r["resourceType"] == "Observation" and "component" in r:
            seen.setdefault("Observation/component", r)
        seen.setdefault(r["resourceType"], r)
    for f in sorted(BULK.glob("*.ndjson.gz")):
        if not f.name.startswith("log."):
            r = orjson.loads(gzip.open(f).readline())
            seen.setdefault("bulk/" + r["resourceType"], r)
    return [seen[k] for k in sorted(seen)]


POOL = _pool()
# Keep every record small enough that deep copies and model validation stay quick.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False) | st.text(max_size=12)
    | st.sampled_from(["2019-05", "2019-05-03T10:00:00", "1999-99-99", "Patient/x", "urn:uuid:1", ""]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


@st.composite
def corrupted(draw):
    record = orjson.loads(orjson.dumps(draw(st.sampled_from(POOL))))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(record) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = record
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["delete", "replace", "add"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "replace":
            parent[path[-1]] = draw(json_values)
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=10))] = draw(json_values)
    return record


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corrupted())
def test_corrupted_record_is_ingested_or_quarantined_never_a_crash(record):
    outcome, events, reason = resource_events(record)
    assert outcome in ("ingested", "rejected", "not used")
    if outcome == "rejected":
        assert isinstance(reason, str) and reason
    if outcome == "ingested":
        assert events.height > 0
        assert events["subject_id"].null_count() == 0 and events["code"].null_count() == 0
        assert events["source_type"].null_count() == 0 and events["source_id"].null_count() == 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corrupted())
def test_full_validation_on_corrupted_records_never_crashes(record):
    outcome, _, reason = resource_events(record, validate_full=True)
    assert outcome in ("ingested", "rejected", "not used")
    assert (reason is None) == (outcome != "rejected")


NDJSON_LINES = gzip.open(BULK / "Condition.000.ndjson.gz").read().splitlines()[:12]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_byte_corrupted_ndjson_file_accounts_for_every_line(tmp_path_factory, flips, cut):
    data = bytearray(b"\n".join(NDJSON_LINES) + b"\n")
    for pos, byte in flips:
        data[pos % len(data)] = byte
    if cut is not None:
        data = data[: cut % len(data)]
    root = tmp_path_factory.mktemp("corrupt")
    (root / "Condition.000.ndjson").write_bytes(bytes(data))
    s = run_ingest([root / "Condition.000.ndjson"], root / "out", workers=1)
    lines = [x for x in bytes(data).split(b"\n") if x.strip()]
    accounted = s.total("ingested") + s.total("rejected") + s.total("not used")
    assert accounted == len(lines)
    assert s.quarantined == s.total("rejected") + s.duplicates


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(cut=st.integers(1, 10**6))
def test_truncated_gzip_never_crashes(tmp_path_factory, cut):
    raw = gzip.compress(b"\n".join(NDJSON_LINES) + b"\n")
    root = tmp_path_factory.mktemp("gz")
    (root / "Condition.000.ndjson.gz").write_bytes(raw[: cut % len(raw)])
    s = run_ingest([root / "Condition.000.ndjson.gz"], root / "out", workers=1)
    assert s.total("ingested") <= len(NDJSON_LINES)
    assert s.quarantined >= 1 or s.total("ingested") == len(NDJSON_LINES)


@pytest.mark.parametrize("record", POOL, ids=lambda r: r["resourceType"])
def test_pool_records_are_valid_to_start_with(record):
    assert resource_events(record)[0] in ("ingested", "not used")


PLAIN_NDJSON = gzip.open(BULK / "Encounter.000.ndjson.gz").read().splitlines()[:40]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(target=st.integers(400, 60_000), blank=st.integers(0, 39), garbage=st.integers(0, 39))
def test_ndjson_byte_ranges_read_every_line_once_with_true_line_numbers(tmp_path_factory, target, blank, garbage):
    from connectors.fhir import sources

    lines = list(PLAIN_NDJSON)
    lines[blank] = b""
    lines[garbage] = b"{not json"
    path = tmp_path_factory.mktemp("split") / "Encounter.000.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n")
    f = sources.InputFile(path, "ndjson", path.stat().st_size)
    whole = [(r.position, r.resource_id, r.error) for r in sources.iter_records(f)]
    ranges = sources.ndjson_ranges(f, target)
    split = [(r.position, r.resource_id, r.error) for rng in ranges for r in sources.read_range(f, [0], *rng)]
    assert split == whole
    assert len(ranges) == max(1, -(-f.size // target)) if f.size > target else len(ranges) == 1
