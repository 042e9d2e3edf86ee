"""Load test of ``mbrec serve``: latency percentiles and throughput on loopback.

Starts ``python -m mbrec serve SOURCE`` on 127.0.0.1 (a free port), waits for ``/healthz``,
then runs closed-loop clients (each sends its next request when the previous answer has
arrived) over keep-alive HTTP/1.1 connections:

* single-user ``GET /v1/recommend?user=U&k=K`` at each ``--concurrency`` level (default 1, 8, 32),
  ``--requests`` requests per level (random known users, seeded);
* batch ``POST /v1/recommend`` with ``--batch-size`` users per request, ``--batch-requests``
  requests at concurrency 1 (and ``--batch-concurrency``).

Every level stops after its request count or ``--max-seconds``, whichever comes first, and the
server is always stopped at the end. The client is a minimal asyncio HTTP/1.1 client (one
process, loopback only), so on a small machine it shares the CPUs with the server: the figures
are what a client on the same machine sees. Prints a markdown table (``--json`` for JSON).

    python benchmarks/bench_serve.py ARTIFACT_DIR [--workers N] [--requests 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(source: str, port: int, workers: int, extra: list[str]) -> subprocess.Popen:
    """``mbrec serve`` as this benchmark runs it (no access log: one line per request would be
    most of the work of a 1 ms request)."""
    cmd = [sys.executable, "-m", "mbrec", "serve", source, "--host", "127.0.0.1", "--port", str(port),
           "--workers", str(workers), "--no-access-log", "--log-level", "warning", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(proc: subprocess.Popen, port: int, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/info", timeout=2) as r:
                return json.loads(r.read())
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"the server did not answer within {timeout:.0f}s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its live descendants (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = {pid}, [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier += kids
    return sum(cpu.get(p, 0.0) for p in tree)


def load_average() -> float:
    return os.getloadavg()[0]


class Connection:
    """One keep-alive HTTP/1.1 connection (answers must carry Content-Length, as uvicorn's do)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        assert self.reader is not None and self.writer is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        if body:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        await self.writer.drain()
        status_line = await self.reader.readuntil(b"\r\n")
        status = int(status_line.split()[1])
        length = 0
        while True:
            line = await self.reader.readuntil(b"\r\n")
            if line == b"\r\n":
                break
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def measure(server_pid: int, port: int, concurrency: int, requests: list[tuple[str, str, bytes]],
            max_seconds: float) -> dict[str, Any]:
    """:func:`run_level` plus the server's CPU milliseconds per request and the load average."""
    load = load_average()
    cpu0 = tree_cpu_seconds(server_pid)
    r = asyncio.run(run_level(port, concurrency, requests, max_seconds))
    r["server_cpu_ms_per_request"] = round((tree_cpu_seconds(server_pid) - cpu0) * 1e3 / max(r["requests"], 1), 3)
    r["load_1min_before"] = round(load, 2)
    return r


async def run_level(port: int, concurrency: int, requests: list[tuple[str, str, bytes]], max_seconds: float) -> dict[str, Any]:
    """Send ``requests`` over ``concurrency`` closed-loop connections; latencies in ms."""
    conns = [Connection(port) for _ in range(concurrency)]
    await asyncio.gather(*(c.open() for c in conns))
    latencies: list[float] = []
    errors = 0
    nxt = 0
    deadline = time.perf_counter() + max_seconds

    async def client(conn: Connection) -> None:
        nonlocal nxt, errors
        while nxt < len(requests) and time.perf_counter() < deadline:
            method, path, body = requests[nxt]
            nxt += 1
            t = time.perf_counter()
            status, _ = await conn.request(method, path, body)
            latencies.append((time.perf_counter() - t) * 1e3)
            errors += status != 200

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in conns))
    elapsed = time.perf_counter() - start
    for c in conns:
        c.close()
    lat = np.array(latencies)
    return {"concurrency": concurrency, "requests": len(lat), "errors": errors, "seconds": round(elapsed, 3),
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p95_ms": round(float(np.percentile(lat, 95)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2), "max_ms": round(float(lat.max()), 2),
            "requests_per_s": round(len(lat) / elapsed, 1)}


def time_load(source: str, repeats: int = 5) -> dict[str, float]:
    """Seconds to load + verify the artifact and build the engine (median of ``repeats``, in
    this process, torch already imported)."""
    from mbrec.serving.artifact import load_artifact
    from mbrec.serving.engine import Engine

    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        Engine(load_artifact(source))
        times.append(time.perf_counter() - t)
    return {"load_seconds_median": round(float(np.median(times)), 4), "load_seconds_max": round(max(times), 4)}


def time_gemm(source: str, batch: int, repeats: int = 20) -> dict[str, float]:
    """Milliseconds of the ``[batch, d] @ [d, items]`` product of the target's dot scorer with
    torch (MKL) and numpy (OpenBLAS), median of ``repeats``, this process's CPU time."""
    import torch

    from mbrec.serving.artifact import load_artifact

    art = load_artifact(source)
    spec = art.scorers[art.manifest["target"]]
    if spec.kind != "dot":
        return {}
    rows = np.random.default_rng(0).integers(0, len(art.user_ids), batch)
    u, it = spec.arrays["user"][rows], spec.arrays["item"]
    tu, ti = torch.from_numpy(u), torch.from_numpy(it)

    def ms(f: Any) -> float:
        f()
        out = []
        for _ in range(repeats):
            t = time.process_time()
            f()
            out.append((time.process_time() - t) * 1e3)
        return round(float(np.median(out)), 2)

    return {"gemm_torch_ms": ms(lambda: tu @ ti.T), "gemm_numpy_ms": ms(lambda: u @ it.T),
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="an artifact folder (mbrec export RUN_DIR OUT_DIR)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--concurrency", default="1,8,32", help="comma list of client counts for the single-user GET")
    ap.add_argument("--requests", type=int, default=3000, help="single-user requests per concurrency level")
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--batch-requests", type=int, default=40)
    ap.add_argument("--batch-concurrency", default="1,2", help="comma list of client counts for the batch POST")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="cap per level (the level stops by itself)")
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    port = free_port()
    proc = start_server(args.source, port, args.workers, [])
    try:
        info = wait_ready(proc, port)
        users = get_users(args.source, info)
        rng = np.random.default_rng(args.seed)
        rows: list[dict[str, Any]] = []

        def singles(n: int) -> list[tuple[str, str, bytes]]:
            from urllib.parse import quote

            return [("GET", f"/v1/recommend?user={quote(u)}&k={args.k}", b"") for u in rng.choice(users, n)]

        def batches(n: int) -> list[tuple[str, str, bytes]]:
            return [("POST", "/v1/recommend", json.dumps({"users": rng.choice(users, args.batch_size).tolist(),
                                                           "k": args.k}).encode()) for _ in range(n)]

        asyncio.run(run_level(port, 4, singles(args.warmup) + batches(4), args.max_seconds))  # warm-up
        for c in (int(x) for x in args.concurrency.split(",")):
            r = measure(proc.pid, port, c, singles(args.requests), args.max_seconds)
            rows.append({"endpoint": "GET /v1/recommend (1 user)", **r, "users_per_s": r["requests_per_s"]})
        for c in (int(x) for x in args.batch_concurrency.split(",")):
            r = measure(proc.pid, port, c, batches(args.batch_requests), args.max_seconds)
            rows.append({"endpoint": f"POST /v1/recommend ({args.batch_size} users)", **r,
                         "users_per_s": round(r["requests_per_s"] * args.batch_size)})
    finally:
        stop_server(proc)
    meta = {"model": info["model"], "dataset": info["dataset"], "n_users": info["n_users"], "n_items": info["n_items"],
            "workers": args.workers, "k": args.k, "cpus": os.cpu_count(),
            "torch_threads_env": os.environ.get("OMP_NUM_THREADS"), **time_load(args.source),
            **time_gemm(args.source, args.batch_size)}
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}))
        return
    print(f"{meta['model']} on {meta['dataset']}: {meta['n_users']:,} users x {meta['n_items']:,} items, k={args.k}, "
          f"{args.workers} worker(s), {meta['cpus']} CPUs, OMP_NUM_THREADS={meta['torch_threads_env']}")
    print(f"artifact load + verify + engine: median {meta['load_seconds_median']}s, max {meta['load_seconds_max']}s "
          f"(in process); GEMM [{args.batch_size} x d] @ [d x items]: torch {meta.get('gemm_torch_ms')} ms, "
          f"numpy {meta.get('gemm_numpy_ms')} ms (CPU time, median)")
    print()
    print("| endpoint | clients | requests | errors | p50 ms | p95 ms | p99 ms | max ms | requests/s | users/s "
          "| server CPU ms/request | load before |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['endpoint']} | {r['concurrency']} | {r['requests']:,} | {r['errors']} | {r['p50_ms']} | {r['p95_ms']} | "
              f"{r['p99_ms']} | {r['max_ms']} | {r['requests_per_s']:,} | {r['users_per_s']:,} | "
              f"{r['server_cpu_ms_per_request']} | {r['load_1min_before']} |")


def get_users(source: str, info: dict[str, Any]) -> np.ndarray:
    """Known user ids, from the artifact's users.npy."""
    return np.load(Path(source) / info["users"], allow_pickle=False)


if __name__ == "__main__":
    main()
