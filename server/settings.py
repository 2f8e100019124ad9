"""Server configuration: one typed settings object, read once from `TTASERVE_*` variables."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

BUNDLED_MODEL = "cifar10-resnet20"


def bundled_model_path() -> Path:
    """The demo model package shipped with ttaserve."""
    return Path(str(resources.files("ttaserve.models") / BUNDLED_MODEL))


class Settings(BaseSettings):
    """Everything the server can be told; passed down explicitly, never re-read."""

    model_config = SettingsConfigDict(env_prefix="TTASERVE_", extra="ignore")

    model: Path = Field(default_factory=bundled_model_path, description="model package folder")
    host: str = "127.0.0.1"
    port: int = 8000
    default_policy: str = "default"  # the recommended combination (README, "Adaptation policies")
    log_level: str = "info"

    # input limits
    max_body_bytes: int = Field(16 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(16_000_000, gt=0)
    max_images_per_request: int = Field(256, gt=0)
    top_k: int = Field(5, ge=1)

    # batching
    max_batch_size: int = Field(128, ge=1, description="images per forward pass")
    max_batch_wait_ms: float = Field(2.0, ge=0, description="wait for more jobs after the first (while other streams are active)")  # fmt: skip
    max_batch_gather_ms: float = Field(100.0, ge=0, description="at most this long gathering the jobs of active streams that keep arriving")  # fmt: skip
    batch_active_window_ms: float = Field(2000.0, gt=0, description="a stream that submitted this recently is expected in the next batch")  # fmt: skip
    writes_in_flight: int = Field(0, ge=0, description="batches whose state writes (store round trips) may still be in flight while the next batch's forward pass runs (0: each batch is written and answered before the next starts); for GPU servers, where a forward pass is as short as a round trip (README, Pipelined batches)")  # fmt: skip
    max_queue_images: int = Field(4096, ge=1, description="queued images before 503")
    torch_threads: int = Field(0, ge=0, description="0: torch's default")
    single_thread_below_images: int = Field(32, ge=0, description="forward passes of fewer images run on one intra-op thread (0: never)")  # fmt: skip
    compile_policies: str = Field("", description="comma-separated policies whose forward is compiled whole with torch.compile at start-up (server/compiled_forward.py; needs a C++ compiler, and a few minutes of warm-up per policy); 'source' compiles the frozen model only, which every listed policy also compiles")  # fmt: skip
    malloc_tuning: bool = Field(True, description="raise glibc's mmap/trim thresholds so that activations reuse heap memory (server/allocator.py)")  # fmt: skip

    # state
    redis_url: str | None = None
    redis_connect_timeout_s: float = Field(0.25, gt=0)
    redis_timeout_s: float = Field(0.5, gt=0, description="per-command socket timeout")
    redis_breaker_cooldown_s: float = Field(0.5, ge=0, description="fail fast this long after an outage error")  # fmt: skip
    redis_count_method: str = Field("scan", pattern="^(scan|dbsize)$", description="dbsize if the Redis database holds only ttaserve keys")  # fmt: skip
    stream_ttl_seconds: float = Field(7 * 24 * 3600, gt=0)
    max_streams: int = Field(100_000, ge=1, description="in-process store LRU bound")
    max_groups: int = Field(32, ge=1, description="distinct X-Stream-Group metric labels")

    def compiled_policy_names(self) -> list[str]:
        """`compile_policies` as a list (validated against the registry at start-up)."""
        return [name.strip() for name in self.compile_policies.split(",") if name.strip()]
