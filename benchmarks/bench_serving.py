"""A bounded load test of ``imram serve`` on loopback: concurrent clients send text searches.

python benchmarks/bench_serving.py [--index DIR] [--rerank CKPT] [--clients 4] [--requests 250]

The server runs in a subprocess on a free 127.0.0.1 port (never another address) and is stopped
at the end. Without ``--index``, an index of the Tux Paint test split is built from the
quickstart runs (``runs/quickstart``) in a temporary folder. Every client sends at most
``--requests`` requests and the run stops at ``--seconds`` whatever happens; the report is the
median and 99th-percentile latency, requests per second, and the number of errors.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote, urlsplit

import numpy as np

HOST = "127.0.0.1"
QUERIES = [
    "a red apple",
    "a cat",
    "an orange fruit",
    "a green tree with leaves",
    "a musical instrument",
    "a car on the road",
    "a smiling face",
    "a bird flying",
]
KS = (1, 5, 10, 20)
QUICKSTART = Path("runs/quickstart")


def default_index(folder: Path) -> Path:
    """An index of the quickstart's Tux Paint test split, by its MEMBER run, built in ``folder``."""
    from imram.retrieval import build_index

    checkpoint, data = QUICKSTART / "quickstart_member", QUICKSTART / "tuxpaint_precomp"
    if not (checkpoint.is_dir() and data.is_dir()):
        raise SystemExit(
            f"no --index given and no quickstart runs in {QUICKSTART} (run `imram quickstart`)"
        )
    out = folder / "index"
    build_index(checkpoint, data, "test", out, progress=False, device="cpu")
    return out


def start_server(
    index: Path, rerank: str | None, device: str, timeout: float
) -> tuple[subprocess.Popen, str]:
    """``imram serve`` on a free loopback port; returns the process and its base URL."""
    command = [sys.executable, "-m", "imram", "serve", "--index", str(index), "--host", HOST]
    command += ["--port", "0", "--device", device, "--log-level", "warning"]
    if rerank:
        command += ["--rerank", rerank]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def forward() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)

    threading.Thread(target=forward, daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        url = next((word for word in line.split() if word.startswith("http://")), None)
        if url is not None:
            if urlsplit(url).hostname != HOST:
                process.terminate()
                raise SystemExit(f"the server announced {url}, not a {HOST} address")
            return process, url.rstrip("/")
    process.terminate()
    raise SystemExit("the server did not start (see its output above)")


def client(url: str, count: int, deadline: float, offset: int) -> tuple[list[float], int]:
    """Send up to ``count`` text searches over one keep-alive connection until ``deadline``;
    return the latencies (seconds) of the successful ones and the number of errors."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    latencies, errors = [], 0
    for n in range(count):
        if time.monotonic() >= deadline:
            break
        q = QUERIES[(n + offset) % len(QUERIES)]
        k = KS[(n + offset) % len(KS)]
        start = time.perf_counter()
        try:
            connection.request("GET", f"/search/text?q={quote(q)}&k={k}")
            response = connection.getresponse()
            body = response.read()
            ok = response.status == 200 and len(json.loads(body)["hits"]) > 0
        except (OSError, http.client.HTTPException, ValueError, KeyError):
            ok = False
            connection.close()
            connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        if ok:
            latencies.append(time.perf_counter() - start)
        else:
            errors += 1
    connection.close()
    return latencies, errors


def run(url: str, clients: int, requests: int, seconds: float) -> dict[str, float]:
    """The load test proper: ``clients`` threads, ``requests`` each, at most ``seconds``."""
    client(url, 5, time.monotonic() + 30, 0)  # warm-up: first calls allocate buffers
    results: list[tuple[list[float], int]] = [([], 0)] * clients
    deadline = time.monotonic() + seconds

    def work(i: int) -> None:
        results[i] = client(url, requests, deadline, offset=i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    latencies = np.array([t for lat, _ in results for t in lat]) * 1000
    errors = sum(e for _, e in results)
    done = len(latencies) + errors
    return {
        "requests": done,
        "errors": errors,
        "seconds": wall,
        "per_second": done / wall,
        "p50_ms": float(np.percentile(latencies, 50)) if len(latencies) else float("nan"),
        "p99_ms": float(np.percentile(latencies, 99)) if len(latencies) else float("nan"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", help="index directory (default: built from the quickstart)")
    parser.add_argument("--rerank", help="IMRAM/SCAN checkpoint for the server's --rerank")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=250, help="per client (default 250)")
    parser.add_argument("--seconds", type=float, default=120.0, help="stop after (default 120)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if not (1 <= args.clients <= 64 and 1 <= args.requests <= 10_000 and args.seconds > 0):
        parser.error("--clients must be in [1, 64], --requests in [1, 10000], --seconds > 0")
    with tempfile.TemporaryDirectory(prefix="imram-bench-serving-") as folder:
        index = Path(args.index) if args.index else default_index(Path(folder))
        process, url = start_server(index, args.rerank, args.device, timeout=120)
        try:
            result = run(url, args.clients, args.requests, args.seconds)
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
    rerank = f", re-ranked by {args.rerank}" if args.rerank else ""
    print(
        f"{args.clients} clients x {args.requests} text searches on {url}{rerank} "
        f"({os.cpu_count()} CPUs, {args.device}): {result['requests']} requests in "
        f"{result['seconds']:.1f} s = {result['per_second']:.1f} req/s; latency p50 "
        f"{result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms; {result['errors']} errors"
    )
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
