"""A real Prometheus scrapes a real server: the series exist, labels stay bounded, rules evaluate.

Needs the `prometheus` binary (Debian package `prometheus`; .ci/run installs it). Skips where
it is missing, and fails instead under CI=true.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from conftest import free_port, png_bytes, random_images, running_server
from ttaserve.server.model_package import LoadedModel
from ttaserve.server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
PREDICT_ROUTE = "/v1/streams/{stream_id}/predict"
# stream id -> X-Stream-Group: the ids must never show up as label values, the groups must
STREAMS = {"cam-0f3a9c": "fog", "cam-77b21e": "fog", "cam-5d0e44": "night"}
GROUPS = set(STREAMS.values())
DEADLINE_S = 20.0


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        reason = "`prometheus` not on PATH: apt-get install prometheus"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true must not skip; .ci/run installs it)")
        pytest.skip(reason)
    return found


class PrometheusProcess:
    """One Prometheus bound to a free loopback port, scraping `target` every second."""

    def __init__(self, binary: str, workdir: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        every_second = {
            "scrape_interval": "1s",
            "scrape_timeout": "1s",
            "evaluation_interval": "1s",
        }
        config = {
            "global": every_second,
            "rule_files": [str(RULES)],  # the deployed rules, evaluated on real scrapes
            "scrape_configs": [{"job_name": "ttaserve", "static_configs": [{"targets": [target]}]}],
        }
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.log = workdir / "prometheus.log"
        self.args = [
            binary,
            f"--config.file={self.config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(base_url=self.url, timeout=5.0)

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        self.wait_for(lambda: self._ready() or None, "Prometheus to become ready")

    def _ready(self) -> bool:
        try:
            return self.client.get("/-/ready").status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        self.client.close()
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def api(self, path: str, **params: str) -> Any:
        response = self.client.get(f"/api/v1/{path}", params=params)
        response.raise_for_status()
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        return self.api("query", query=promql)["result"]

    def groups_of(self, promql: str) -> set[str]:
        """The `group` label values of the query's current samples."""
        return label_values([s["metric"] for s in self.query(promql)], "group")

    def wait_for(self, probe: Callable[[], Any], what: str) -> Any:
        """Poll `probe` until it returns something truthy; fail with the log after the deadline."""
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                break
            if result := probe():
                return result
            time.sleep(0.25)
        tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
        pytest.fail(f"timed out waiting for {what} ({DEADLINE_S:.0f} s); Prometheus log:\n{tail}")


@contextmanager
def running_prometheus(binary: str, workdir: Path, target: str) -> Iterator[PrometheusProcess]:
    prometheus = PrometheusProcess(binary, workdir, target)
    try:
        prometheus.start()
        yield prometheus
    finally:
        prometheus.stop()


def label_values(series: list[dict[str, str]], label: str) -> set[str]:
    return {s[label] for s in series if label in s}


def test_prometheus_scrapes_bounded_series(
    random_package: Path, random_model: LoadedModel, tmp_path: Path
) -> None:
    binary = prometheus_binary()
    settings = Settings(model=random_package, max_batch_wait_ms=1.0)
    with running_server(settings, random_model) as server:
        routes = {getattr(r, "path", "") for r in server.app.routes} | {"unmatched"}
        with httpx.Client(base_url=server.url, timeout=30.0) as client:
            for i, (stream_id, group) in enumerate(STREAMS.items()):
                for image in random_images(2, seed=i):
                    r = client.post(
                        PREDICT_ROUTE.format(stream_id=stream_id),
                        content=png_bytes(image),
                        headers={"content-type": "image/png", "x-stream-group": group},
                    )
                    assert r.status_code == 200, r.text
            assert client.get(f"/v1/streams/{next(iter(STREAMS))}").status_code == 200

        target = f"127.0.0.1:{server.port}"
        with running_prometheus(binary, tmp_path, target) as prom:
            predicted = f'ttaserve_http_requests_total{{route="{PREDICT_ROUTE}",status="200"}}'
            prom.wait_for(lambda: prom.query(predicted), "ttaserve_http_requests_total samples")
            prom.wait_for(
                lambda: prom.groups_of("ttaserve_group_images_total") == GROUPS,
                f"ttaserve_group_images_total samples for groups {sorted(GROUPS)} "
                "(does the server count images per X-Stream-Group?)",
            )
            prom.wait_for(
                lambda: prom.groups_of("ttaserve:group_images:rate1m") == GROUPS,
                "the recording rule ttaserve:group_images:rate1m",
            )
            targets = prom.api("targets")["activeTargets"]
            series = prom.api("series", **{"match[]": '{__name__=~"ttaserve_.+"}'})
            rule_groups = prom.api("rules")["groups"]

    assert [(t["scrapeUrl"], t["health"]) for t in targets] == [(f"http://{target}/metrics", "up")]  # fmt: skip
    assert {s["__name__"] for s in series} >= {"ttaserve_http_requests_total", "ttaserve_group_images_total", "ttaserve_http_request_duration_seconds_bucket"}  # fmt: skip

    values = {v for s in series for k, v in s.items() if k != "__name__"}
    leaked = {v for v in values for stream_id in STREAMS if stream_id in v}
    assert not leaked, f"stream ids leaked into label values: {sorted(leaked)}"
    assert label_values(series, "group") == GROUPS
    assert label_values(series, "route") <= routes, "route labels must be route templates"

    broken = [(r["name"], r.get("lastError")) for g in rule_groups for r in g["rules"] if r["health"] == "err"]  # fmt: skip
    assert not broken, f"rules failing on real data: {broken}"
