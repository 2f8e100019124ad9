"""The write-pipelining probe runs end to end against a real redis-server and reports
both settings side by side."""

import pytest

from ttaserve.bench import write_pipeline
from ttaserve.clients.local_redis import find_redis_server


@pytest.mark.skipif(find_redis_server() is None, reason="needs redis-server")
def test_probe_prints_serial_and_pipelined_throughput(capsys):
    write_pipeline.main(["--streams", "3", "--images", "2", "--seconds", "0.3", "--warmup-s", "0.2", "--rounds", "1", "--delays-ms", "1", "--threads", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert "writes in flight 0:" in out and "writes in flight 4:" in out
    row = next(line for line in out.splitlines() if line.startswith("| 1.0 ms |"))
    serial, pipelined = (float(cell) for cell in row.split("|")[2:4])
    assert serial > 0 and pipelined > 0
