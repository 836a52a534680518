"""Where one /predict request's CPU goes, in process, on one thread: each stage of the Predictor's path timed alone
(median of N calls) for the shipped patient closest to --patient-mb.

    python bench/request_stages.py --bundle kit-runs/demo/clinical.kitbundle
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "data" / "fhir" / "synthea-bundles"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=REPO / "kit-runs" / "demo" / "clinical.kitbundle")
    ap.add_argument("--patient-mb", type=float, default=1.0)
    ap.add_argument("--calls", type=int, default=30)
    args = ap.parse_args()

    import numpy as np
    import orjson
    import polars as pl
    import torch

    from kit.eval.scoring import row_logits
    from kit.predict.formats import get_format
    from kit.predict.predictor import _NO_LABELS, Predictor, relax_gc
    from kit.tokenizer import windows
    from kit.train.data import rows_from_frame

    torch.set_num_threads(1)
    p = Predictor.load(args.bundle)
    p.warm_up()
    relax_gc()
    raw = min((gzip.decompress(f.read_bytes()) for f in EXAMPLES.glob("*.json.gz")), key=lambda b: abs(len(b) - args.patient_mb * 1e6))
    wire = get_format(p.bundle.vertical)
    times: dict[str, float] = {}

    def timed(name, fn):
        out = fn()
        ts = []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            out = fn()
            ts.append((time.perf_counter() - t0) * 1000)
        times[name] = statistics.median(ts)
        return out

    doc = timed("JSON decoding", lambda: orjson.loads(raw))
    sd = timed("FHIR to events", lambda: wire.parse(doc))
    samples = timed("samples", lambda: p.samples(sd, None))
    tokens = timed("encode", lambda: p.tokenizer.encode(sd.events, sd.subjects, engine="in-memory"))
    win = timed("windows", lambda: windows(tokens, samples, p.max_len))
    names = list(p.tasks)
    first = p.tasks[names[0]]

    def rows():
        frame = win.with_columns(pl.lit(int(first["task_token_id"]), dtype=pl.Int32).alias("task_token_id"), *_NO_LABELS)
        base, _ = rows_from_frame(frame, names[0], first["type"], int(first["num_outputs"]))
        ids = {n: np.int64(p.tasks[n]["task_token_id"]) for n in names}
        return [r if j == 0 else replace(r, input_ids=np.append(r.input_ids[:-1], ids[n]), task=n)
                for r in base for j, n in enumerate(names)]

    rs = timed("rows", rows)
    timed("model", lambda: row_logits(p.model, rs, p.device, batch_size=64, bf16=False))
    preds = p.predict_data(sd, explain=False)
    timed("render", lambda: orjson.dumps(wire.render(preds, p.info, [])))
    timed("end to end", lambda: orjson.dumps(wire.render(p.predict_data(wire.parse(orjson.loads(raw)), explain=False), p.info, [])))
    print(f"{len(raw) / 1e6:.2f} MB patient, {sd.events.height} events, {tokens.height} tokens, {len(names)} tasks; "
          f"median of {args.calls} calls, one thread")
    for name, ms in times.items():
        print(f"  {name:16s} {ms:7.2f} ms")


if __name__ == "__main__":
    main()
