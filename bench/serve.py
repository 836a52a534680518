"""Serving benchmark: `kit serve` on loopback under a bounded concurrent load, and batch scoring throughput.

- Single-patient latency: C concurrent clients POST one Synthea patient Bundle (~1 MB of JSON, the largest shipped
  example, parsing included) to /predict for D seconds; p50/p90/p99 latency, requests/s, failed requests.
- Batch: the shipped patients POSTed to /predict/batch, 10 a call: streamed (every patient 15 times, calls kept in
  flight, as a nightly job sends) and as one burst (the slowest call ends it); patients/s.
- Memory: the server's RSS sampled every 0.5 s through the run (start, end, peak): flat means no growth.

The server is the real `kit serve` command in a subprocess; the clients are asyncio (httpx) in this process.

    python bench/serve.py --bundle kit-runs/demo/clinical.kitbundle              # 8 clients, 60 s
    python bench/serve.py --bundle B --clients 4 --seconds 20 --explain
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
EXAMPLES = REPO / "examples" / "data" / "fhir" / "synthea-bundles"


def _own_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of the server and its workers so far."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def _rss_mb(pid: int) -> float:
    """The server's resident memory: the process and its worker processes (`--workers N`), summed."""
    return sum(_own_rss_mb(p) for p in _tree(pid)) or float("nan")


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.samples, self.stop = pid, every, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.perf_counter(), _rss_mb(self.pid)))
            time.sleep(self.every)


def start_server(bundle: Path, explain: bool, workers: int = 1) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "kit", "serve", "--bundle", str(bundle), "--port", "0", "--workers", str(workers)]
    # (uvicorn prints the port it bound at info level)
    cmd.append("--explain" if explain else "--no-explain")
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise SystemExit("kit serve did not start:\n" + "".join(seen))
        seen.append(line)
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep the pipe drained
            url = f"http://127.0.0.1:{m.group(1)}"
            _wait_healthy(url, deadline)
            return proc, url
    proc.kill()
    raise SystemExit("kit serve did not report its port in 300 s")


def _wait_healthy(url: str, deadline: float) -> None:
    """With --workers N the port is bound before the workers listen: wait until one answers."""
    import httpx

    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"kit serve at {url} did not answer /health")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


async def load(url: str, body: bytes, clients: int, seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    failures: dict[str, int] = {}
    stop = time.perf_counter() + seconds
    headers = {"Content-Type": "application/fhir+json"}

    async def client(c: httpx.AsyncClient) -> None:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                r = await c.post(f"{url}/predict", content=body, headers=headers)
                ok = r.status_code == 200
                key = str(r.status_code)
            except httpx.HTTPError as exc:
                ok, key = False, type(exc).__name__
            if ok:
                latencies.append((time.perf_counter() - t0) * 1000)
            else:
                failures[key] = failures.get(key, 0) + 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as c:
        t0, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(client(c) for _ in range(clients)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    # The clients share the machine's cores with the server: their CPU time is the load generator's cost.
    return {"requests": len(latencies), "failed": sum(failures.values()), "failures": failures, "wall_s": wall,
            "client_cpu_ms_per_request": 1000 * cpu / max(1, len(latencies) + sum(failures.values())),
            "rps": len(latencies) / wall, "p50_ms": pct(latencies, 50), "p90_ms": pct(latencies, 90),
            "p99_ms": pct(latencies, 99), "max_ms": max(latencies, default=float("nan"))}


def batch(url: str, docs: list[dict], repeats: int, per_request: int, clients: int = 1, stream_repeats: int = 15) -> dict:
    """Batch scoring throughput, two ways, `per_request` patients per /predict/batch call (under the size limit):
    - streamed: every document `stream_repeats` times (~10 s: a 3-s run moved by several patients/s from run to run
      on this VM), the calls queued at once and kept `clients` in flight (a nightly job
      sending its export): patients / wall time;
    - burst: every document once, all calls sent together, the best of `repeats` (the slowest call ends it, so a
      worker left idle at the end counts against it)."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    bodies = [json.dumps(docs[i:i + per_request]).encode() for i in range(0, len(docs), per_request)]
    times, ok = [], 0
    with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=clients)) as c:
        def post(body: bytes) -> int:
            r = c.post(f"{url}/predict/batch", content=body, headers={"Content-Type": "application/fhir+json"})
            r.raise_for_status()
            return sum(e["response"]["status"] == "200" for e in r.json()["entry"])

        with ThreadPoolExecutor(clients) as pool:
            for _ in range(repeats):
                t0 = time.perf_counter()
                ok = sum(pool.map(post, bodies))
                times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            streamed_ok = sum(pool.map(post, bodies * stream_repeats))
            streamed_s = time.perf_counter() - t0
    best = min(times)
    return {"patients": len(docs), "per_request": per_request, "clients": clients, "json_mb": sum(map(len, bodies)) / 1e6,
            "repeats": repeats, "best_s": best, "median_s": sorted(times)[len(times) // 2],
            "patients_per_s": len(docs) / best, "ok": ok,
            "streamed": {"patients": len(docs) * stream_repeats, "scored": streamed_ok, "seconds": streamed_s,
                         "patients_per_s": len(docs) * stream_repeats / streamed_s}}


def _decode_ms(raw: bytes) -> float:
    """The machine's speed right now: orjson decoding of the single-patient Bundle, median of 21 calls. A shared VM
    varies by tens of percent from hour to hour; runs compare only when this does."""
    import statistics

    import orjson

    ts = []
    for _ in range(21):
        t0 = time.perf_counter()
        orjson.loads(raw)
        ts.append((time.perf_counter() - t0) * 1000)
    return statistics.median(ts)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores, {cpu}, {platform.system()} {platform.release()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=REPO / "kit-runs" / "demo" / "clinical.kitbundle")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--batch-repeats", type=int, default=5, help="bursts (the best one counts)")
    ap.add_argument("--batch-stream-repeats", type=int, default=15, help="times each patient is sent, streamed")
    ap.add_argument("--batch-per-request", type=int, default=10, help="patients per /predict/batch request")
    ap.add_argument("--patient-mb", type=float, default=1.0, help="size of the single-patient Bundle to send")
    ap.add_argument("--explain", action=argparse.BooleanOptionalAction, default=False,
                    help="serve with explanations on (kit serve --explain; off by default, as kit serve)")
    ap.add_argument("--workers", type=int, default=1, help="kit serve --workers (processes; one per core)")
    ap.add_argument("--batch-clients", type=int, default=0,
                    help="batch calls in flight (default: 2 per worker, so a worker never waits for its next call)")
    args = ap.parse_args()
    if not args.bundle.exists():
        raise SystemExit(f"{args.bundle}: no bundle; run examples/demo.sh first or pass --bundle")
    files = sorted(EXAMPLES.glob("*.json.gz"), key=lambda p: p.stat().st_size)
    docs = [json.loads(gzip.decompress(p.read_bytes())) for p in files]
    raw = [gzip.decompress(p.read_bytes()) for p in files]
    single = min(raw, key=lambda b: abs(len(b) - args.patient_mb * 1e6))  # the patient closest to the asked size
    load1 = os.getloadavg()
    speed = _decode_ms(single)
    proc, url = start_server(args.bundle, args.explain, args.workers)
    sampler = RssSampler(proc.pid)
    sampler.start()
    try:
        import httpx

        for _ in range(4 * args.workers):  # warm-up: first-call costs (allocator, caches) are not steady state
            httpx.post(f"{url}/predict", content=single, headers={"Content-Type": "application/fhir+json"}, timeout=120)
        rss_start = _rss_mb(proc.pid)
        cpu0 = _cpu_s(proc.pid)
        lat = asyncio.run(load(url, single, args.clients, args.seconds))
        lat["server_cpu_ms_per_request"] = 1000 * (_cpu_s(proc.pid) - cpu0) / max(1, lat["requests"] + lat["failed"])
        rss_after_load = _rss_mb(proc.pid)
        bat = batch(url, docs, args.batch_repeats, args.batch_per_request, args.batch_clients or 2 * args.workers,
                    args.batch_stream_repeats)
        rss_end = _rss_mb(proc.pid)
    finally:
        sampler.stop.set()
        proc.terminate()
        proc.wait(30)
    peak = max((r for _, r in sampler.samples), default=float("nan"))
    result = {
        "machine": machine(), "speed_check_json_decode_ms": speed, "loadavg_before": load1,
        "loadavg_after": os.getloadavg(), "bundle": str(args.bundle),
        "explain": args.explain, "workers": args.workers, "clients": args.clients, "seconds": args.seconds,
        "single_patient_json_mb": len(single) / 1e6, "single": lat, "batch": bat,
        "rss_mb": {"start": rss_start, "after_load": rss_after_load, "end": rss_end, "peak": peak,
                   "series_10s": [round(r) for t, r in sampler.samples[::20]]},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "serve.json").write_text(json.dumps(result, indent=1))
    print(f"machine: {result['machine']}; load average before {load1[0]:.1f}, after {result['loadavg_after'][0]:.1f}; "
          f"speed check: the patient's JSON decodes in {speed:.1f} ms")
    print(f"/predict, one {result['single_patient_json_mb']:.2f} MB patient Bundle, {args.clients} clients x {args.seconds:.0f} s, "
          f"explain={args.explain}:")
    print(f"  {lat['requests']} ok, {lat['failed']} failed, {lat['rps']:.1f} req/s, p50 {lat['p50_ms']:.0f} ms, "
          f"p90 {lat['p90_ms']:.0f} ms, p99 {lat['p99_ms']:.0f} ms, max {lat['max_ms']:.0f} ms; "
          f"CPU per request: server {lat['server_cpu_ms_per_request']:.0f} ms, load generator "
          f"{lat['client_cpu_ms_per_request']:.0f} ms")
    st = bat["streamed"]
    print(f"/predict/batch, {bat['patients']} patients ({bat['json_mb']:.1f} MB, {bat['per_request']} per request, "
          f"{bat['clients']} calls in flight):\n  streamed {st['patients']} in {st['seconds']:.2f} s = "
          f"{st['patients_per_s']:.1f} patients/s ({st['scored']} scored); burst of {bat['patients']}: best "
          f"{bat['best_s']:.2f} s = {bat['patients_per_s']:.1f} patients/s")
    r = result["rss_mb"]
    print(f"server RSS MB: start {r['start']:.0f}, after load {r['after_load']:.0f}, end {r['end']:.0f}, peak {r['peak']:.0f}; "
          f"every 10 s: {r['series_10s']}")
    print(f"-> {OUT / 'serve.json'}")


if __name__ == "__main__":
    main()
