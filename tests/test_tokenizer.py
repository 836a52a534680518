"""The EHRMamba-style tokenizer on real Synthea events: structure, value bins, vocabulary, round trip, windows."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import polars as pl
import pytest

from kit.datasets.mixing import MixingConfig, mixing_weights
from kit.datasets.splits import SplitConfig, assign_splits, split_of
from kit.events import read_subjects, scan_events
from kit.tokenizer import CLS, INTERVAL_TOKENS, TOKEN_TYPES, UNK, VE, VS, Tokenizer, TokenizerConfig, windows


@pytest.fixture(scope="module")
def store(synthea_events):
    subjects = read_subjects(synthea_events)
    ids = sorted(subjects.get_column("subject_id").to_list())
    train, other = ids[:200], ids[200:]
    events = scan_events(synthea_events)
    return {
        "subjects": subjects,
        "train_events": events.filter(pl.col("subject_id").is_in(train)),
        "other": other,
        "events": events,
    }


@pytest.fixture(scope="module")
def tokenizer(store) -> Tokenizer:
    return Tokenizer.fit(store["train_events"], TokenizerConfig(min_count=5), extra_tokens=["[TASK:x]"])


@pytest.fixture(scope="module")
def encoded(store, tokenizer) -> pl.DataFrame:
    ev = store["events"].filter(pl.col("subject_id").is_in(store["other"][:40])).collect()
    return tokenizer.encode(ev, store["subjects"])


def test_round_trip_gives_identical_encodings(tmp_path, tokenizer, store, encoded):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    again = Tokenizer.load(path)
    assert again.vocab == tokenizer.vocab and again.value_bins == tokenizer.value_bins
    assert again.config == tokenizer.config
    ev = store["events"].filter(pl.col("subject_id").is_in(store["other"][:40])).collect()
    assert again.encode(ev, store["subjects"]).equals(encoded)
    again.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes()


def test_sequence_structure(encoded, tokenizer):
    assert encoded.get_column("token_id").min() >= 0 and encoded.get_column("token_id").max() < tokenizer.vocab_size
    for _, seq in encoded.group_by("subject_id", maintain_order=True):
        toks = seq.get_column("token").to_list()
        assert toks[0] == CLS
        times = seq.get_column("time").to_list()
        assert all(a <= b for a, b in zip(times, times[1:])), "tokens are in time order"
        assert seq.filter(pl.col("type") == TOKEN_TYPES["static"]).get_column("token").str.contains("^(GENDER|RACE|ETHNICITY)/").all()
        vs = seq.filter(pl.col("token") == VS)
        ve = seq.filter(pl.col("token") == VE)
        assert vs.get_column("visit").to_list() == sorted(set(vs.get_column("visit").to_list()))
        assert sorted(ve.get_column("visit").to_list()) == vs.get_column("visit").to_list()
        # Each visit's events sit between its [VS] and [VE].
        for v, part in seq.filter(pl.col("visit") > 0).group_by("visit"):
            inner = part.filter(~pl.col("token").is_in([VS, VE] + INTERVAL_TOKENS))
            vs_t = part.filter(pl.col("token") == VS).item(0, "time")
            ve_t = part.filter(pl.col("token") == VE).item(0, "time")
            assert inner.select((pl.col("time") >= vs_t) & (pl.col("time") <= ve_t)).to_series().all()
        # An interval token always comes right before a visit start.
        for i, t in enumerate(toks):
            if t in INTERVAL_TOKENS:
                assert toks[i + 1] == VS
        assert "ENCOUNTER/" not in "".join(t for t in toks if t.endswith("/END"))
    assert encoded.filter(pl.col("token").is_in(INTERVAL_TOKENS)).height > 100
    ages = encoded.filter(pl.col("token") == "MEDS_BIRTH").get_column("age")
    assert ages.abs().max() < 1e-3


def test_value_bins_are_fit_on_train_only(store, tokenizer):
    code = "LOINC/8302-2"  # body height: every subject has it
    train_vals = store["train_events"].filter((pl.col("code") == code) & pl.col("numeric_value").is_not_null()).collect()
    expected = sorted({float(np.quantile(train_vals.get_column("numeric_value").cast(pl.Float64).to_numpy(), i / 10)) for i in range(1, 10)})
    assert tokenizer.value_bins[code] == pytest.approx(expected)
    everyone = Tokenizer.fit(store["events"], TokenizerConfig(min_count=5))
    assert everyone.value_bins[code] != tokenizer.value_bins[code], "val/test values would move the cut points"
    # Values map to the bin whose cut points bracket them.
    ev = store["events"].filter(pl.col("subject_id").is_in(store["other"][:40])).collect()
    enc = tokenizer.encode(ev.filter(pl.col("code") == code).head(200), store["subjects"])
    vals = ev.filter(pl.col("code") == code).head(200).get_column("numeric_value").to_list()
    got = [int(t.split("#Q")[1]) for t in enc.filter(pl.col("type") == TOKEN_TYPES["value"]).get_column("token").to_list()]
    cuts = tokenizer.value_bins[code]
    assert got == [1 + sum(c <= float(v) for c in cuts) for v in vals]


def test_min_count_and_unknown_tokens(store):
    strict = Tokenizer.fit(store["train_events"], TokenizerConfig(min_count=50))
    loose = Tokenizer.fit(store["train_events"], TokenizerConfig(min_count=1))
    assert strict.vocab_size < loose.vocab_size
    ev = store["events"].filter(pl.col("subject_id").is_in(store["other"])).collect()
    enc = strict.encode(ev, store["subjects"])
    unk = enc.filter(pl.col("token_id") == strict.token_to_id[UNK])
    assert unk.height > 0 and not unk.get_column("token").is_in(strict.vocab).any()
    assert strict.id_of("NOT/A-CODE") == strict.token_to_id[UNK]


def test_windows_truncate_left_and_stop_before_the_prediction_time(encoded):
    sid = encoded.group_by("subject_id").len().sort("len").item(-1, "subject_id")
    seq = encoded.filter(pl.col("subject_id") == sid)
    pt = seq.item(seq.height - 5, "time")
    samples = pl.DataFrame({"subject_id": [sid, sid], "prediction_time": [pt, datetime(1800, 1, 1)]})
    out = windows(encoded, samples, max_len=64)
    before = seq.filter(pl.col("time") < pt)
    row = out.row(0, named=True)
    assert row["n_tokens"] == 64 and max(row["token_time"]) < pt
    n_prefix = seq.filter(pl.col("type").is_in([TOKEN_TYPES["special"], TOKEN_TYPES["static"]])).height
    ids = before.get_column("token_id").to_list()
    assert row["input_ids"] == ids[:n_prefix] + ids[-(64 - n_prefix):]
    assert min(v for v in row["token_visit"] if v > 0) == 1
    assert out.row(1, named=True)["n_tokens"] == 0  # nothing before birth


def test_splits_and_mixing():
    ids = list(range(1, 5001))
    cfg = SplitConfig()
    table = assign_splits(ids, cfg)
    frac = table.group_by("split").len().sort("split")
    share = dict(zip(frac.get_column("split"), frac.get_column("len") / len(ids)))
    assert abs(share["train"] - 0.8) < 0.03 and abs(share["test"] - 0.1) < 0.03
    assert [split_of(i, cfg) for i in ids[:50]] == table.get_column("split").to_list()[:50]
    other = assign_splits(ids, SplitConfig(salt="other"))
    assert (other.get_column("split") != table.get_column("split")).sum() > 500
    sizes = {"a": 10_000, "b": 100, "c": 0}
    prop = mixing_weights(sizes, MixingConfig(temperature=1.0))
    assert prop["a"] == pytest.approx(10_000 / 10_100) and prop["c"] == 0
    flat = mixing_weights(sizes, MixingConfig(temperature=1000.0))
    assert flat["a"] == pytest.approx(0.5, abs=0.01)
    t2 = mixing_weights(sizes, MixingConfig(temperature=2.0))
    assert prop["b"] < t2["b"] < flat["b"]
    tilted = mixing_weights(sizes, MixingConfig(temperature=1.0, weights={"b": 100}))
    assert tilted["b"] == pytest.approx(0.5)


def test_windows_invariants_hold_for_any_time_and_length(encoded):
    """Property test: for random subjects, prediction times and max_len, a window is exactly the tokens strictly
    before the time, left-truncated behind [CLS] and the static tokens."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    sids = encoded.get_column("subject_id").unique().sort().to_list()
    per_subject = {sid: encoded.filter(pl.col("subject_id") == sid) for sid in sids}
    prefix_types = [TOKEN_TYPES["special"], TOKEN_TYPES["static"]]

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.sampled_from(sids), st.floats(0, 1.05), st.integers(8, 300))
    def check(sid, frac, max_len):
        seq = per_subject[sid]
        t0, t1 = seq.get_column("time").min(), seq.get_column("time").max()
        pt = t0 + (t1 - t0) * frac
        row = windows(encoded, pl.DataFrame({"subject_id": [sid], "prediction_time": [pt]}), max_len).row(0, named=True)
        ids = seq.filter(pl.col("time") < pt).get_column("token_id").to_list()
        assert row["n_tokens"] == min(len(ids), max_len) == len(row["input_ids"])
        if row["n_tokens"]:
            assert max(row["token_time"]) < pt
        if len(ids) <= max_len:
            assert row["input_ids"] == ids
        else:
            n_prefix = min(seq.filter(pl.col("type").is_in(prefix_types)).height, max_len // 2)
            assert row["input_ids"] == ids[:n_prefix] + ids[len(ids) - (max_len - n_prefix):]
        visits = [v for v in row["token_visit"] if v > 0]
        assert not visits or min(visits) == 1

    check()


def test_rare_value_bin_falls_back_to_its_code(store):
    tk = Tokenizer.fit(store["train_events"], TokenizerConfig(min_count=40))
    rare_bins = [
        (code, q) for code in tk.value_bins for q in range(1, len(tk.value_bins[code]) + 2)
        if f"{code}#Q{q}" not in tk.token_to_id and code in tk.token_to_id
    ]
    assert rare_bins, "with min_count 40 some bins of frequent codes are rare"
    ev = store["events"].filter(pl.col("subject_id").is_in(store["other"])).collect()
    enc = tk.encode(ev, store["subjects"])
    fallen = enc.filter(pl.col("token").is_in([f"{c}#Q{q}" for c, q in rare_bins]))
    assert fallen.height > 0
    assert fallen.select(
        pl.col("token_id") == pl.col("token").str.replace(r"#Q\d+$", "").replace_strict(tk.token_to_id, default=-1)
    ).to_series().all()
