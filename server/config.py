"""EngineConfig and ServerConfig: built once (CLI flags over a model_configs YAML over
defaults), validated, then read-only. Nothing deeper in the code reads the environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from vlmserve.multimodal.types import MediaConfig


@dataclass(frozen=True)
class EngineConfig:
    model: str = ""  # a local checkpoint directory (resolved by the loader)
    dtype: str = "auto"  # auto: float32 on CPU, the checkpoint's dtype on CUDA
    device: str = "auto"  # auto: cuda if available, else cpu
    kernel_backend: str = "auto"  # auto | triton | torch
    seed: int = 0
    # Paged KV cache.
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: derived from kv_cache_memory_gb
    # Cross-attention families (Mllama): blocks of the per-request cross K/V pool.
    # None: a quarter of kv_cache_memory_gb on top of the self-attention cache (on CUDA with
    # the cache sized by gpu_memory_utilization: a fifth of that budget).
    num_cross_kv_blocks: int | None = None
    # None: on CUDA, whatever gpu_memory_utilization leaves after the weights and a profiled
    # step (engine/memory.py); elsewhere 1 GiB.
    kv_cache_memory_gb: float | None = None
    gpu_memory_utilization: float = 0.9
    # Ranks the decoder is split over (runner/tensor_parallel.py): rank 0 is the engine core,
    # the others are worker processes it drives; 1 is the plain single-process engine.
    tensor_parallel_size: int = 1
    enable_prefix_caching: bool = True
    # Scheduling.
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    # Encoder: at most this many encoder output rows computed per step, and cached at once.
    max_encoder_tokens_per_step: int = 16384
    encoder_cache_size: int = 32768
    # Image processor overrides (None: the checkpoint's preprocessor_config.json).
    min_pixels: int | None = None
    max_pixels: int | None = None
    # Where the step loop of `vlmserve serve` runs: "process" (its own process: the API
    # process's HTTP, JSON, media and detokenization never contend with it for the GIL) or
    # "thread" (a thread of the API process). The offline `LLM` always runs in the caller.
    engine_mode: str = "process"

    def __post_init__(self) -> None:
        if self.engine_mode not in ("process", "thread"):
            raise ValueError(f"engine_mode (--engine-mode) must be process or thread, got {self.engine_mode!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if self.kernel_backend not in ("auto", "triton", "torch"):
            raise ValueError(f"kernel_backend must be auto, triton or torch, got {self.kernel_backend!r}")
        for name in ("block_size", "max_num_batched_tokens", "max_num_seqs", "max_encoder_tokens_per_step",
                     "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory_gb is not None and not self.kv_cache_memory_gb > 0:
            raise ValueError(f"kv_cache_memory_gb must be greater than 0, got {self.kv_cache_memory_gb}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks must be at least 2, got {self.num_kv_blocks}")


DEFAULT_MM_LIMITS = {"image": 32, "video": 2}


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    api_key: str | None = None
    max_request_body_bytes: int = 64 * 1024 * 1024
    # Admission control: requests in flight past which new ones get 503, counted from arrival
    # (fetching and decoding media, rendering, queued, running) to the end of the response.
    max_pending_requests: int = 4096
    # Bytes of decoded media and pixels that requests in flight may hold (both processes), in
    # GiB; past it, new requests with media get 503 + Retry-After before anything is fetched.
    # None: a quarter of the machine's memory (the cgroup limit in a container).
    max_media_memory_gb: float | None = None
    # Most media items per request. Bounded by default: every item is fetched and decoded
    # before the prompt's length is known, so an unbounded count is a memory attack.
    limit_mm_per_prompt: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_MM_LIMITS))
    log_level: str = "info"
    # On SIGTERM, keep serving this many seconds with /ready answering 503, so a load
    # balancer (Kubernetes endpoints) stops routing here before the listener closes; then
    # stop accepting and finish the requests in flight. 0: stop accepting at once.
    drain_seconds: float = 0.0
    # Autoscaling signals and admission control (server/autoscale/).
    target_queue_wait_s: float = 1.0  # the wait desired_replicas and the webhook aim for
    max_queue_wait_s: float | None = None  # 429 when the estimated queue wait exceeds it
    max_waiting_requests: int | None = None  # 429 when this many requests already wait
    scale_webhook: tuple[str, ...] = ()  # URLs POSTed on sustained overload and on recovery
    scale_webhook_cooldown_s: float = 30.0
    scale_webhook_sustain_s: float = 3.0  # how long the wait must stay above (or under) target
    # With requests pending, an engine step loop silent this long is dead (/health 503).
    engine_watchdog_s: float = 60.0
    # Tool-call format for tool_choice "auto" (hermes, mistral, llama3_json, grammar_only);
    # None: the model family's own (`vlmserve.api.tools.formats.FAMILY_FORMATS`).
    tool_call_format: str | None = None

    def __post_init__(self) -> None:
        from vlmserve.autoscale.admission import AdmissionPolicy
        from vlmserve.autoscale.webhook import check_webhook_url

        if not self.target_queue_wait_s > 0:
            raise ValueError(f"--target-queue-wait-s must be greater than 0, got {self.target_queue_wait_s}")
        AdmissionPolicy(self.max_queue_wait_s, self.max_waiting_requests)  # validates
        if isinstance(self.scale_webhook, str):
            object.__setattr__(self, "scale_webhook", (self.scale_webhook,))
        object.__setattr__(self, "scale_webhook", tuple(check_webhook_url(u) for u in self.scale_webhook))
        for name in ("scale_webhook_cooldown_s", "scale_webhook_sustain_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 0, got {getattr(self, name)}")
        if not self.engine_watchdog_s > 0:
            raise ValueError(f"--engine-watchdog-s must be greater than 0, got {self.engine_watchdog_s}")
        if self.max_pending_requests < 1:
            raise ValueError(f"max_pending_requests must be at least 1, got {self.max_pending_requests}")
        if self.max_media_memory_gb is not None and not self.max_media_memory_gb > 0:
            raise ValueError(f"max_media_memory_gb (--max-media-memory-gb) must be greater than 0, "
                             f"got {self.max_media_memory_gb}")

    def media_memory_budget(self) -> tuple[int, str]:
        """The media memory budget in bytes (`max_media_memory_gb`, else the machine's default)
        and how it was set, for messages."""
        from vlmserve.multimodal.budget import DEFAULT_MEMORY_FRACTION, GiB, default_media_memory_bytes

        if self.max_media_memory_gb is None:
            n = default_media_memory_bytes()
            return n, (f"--max-media-memory-gb unset: {n / GiB:.2f} GiB, {DEFAULT_MEMORY_FRACTION:.0%} of this "
                       "machine's memory")
        return max(1, int(self.max_media_memory_gb * GiB)), f"--max-media-memory-gb {self.max_media_memory_gb:g}"


@dataclass(frozen=True)
class Config:
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    media: MediaConfig = field(default_factory=MediaConfig)


# Flag names that differ from the MediaConfig field they set.
_MEDIA_ALIASES = {
    "allow_private_media_urls": "allow_private_networks",
    "media_cache_bytes": "cache_bytes",
    "media_workers": "workers",
}


def parse_mm_limits(spec: str | dict[str, int]) -> dict[str, int]:
    """'image=4,video=1' (or a mapping) → {"image": 4, "video": 1}."""
    if isinstance(spec, dict):
        items = spec.items()
    else:
        items = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"--limit-mm-per-prompt expects modality=N pairs like image=4,video=1; got {part!r}")
            items.append((name.strip(), value))
    out = {}
    for name, value in items:
        if name not in ("image", "video"):
            raise ValueError(f"--limit-mm-per-prompt: unknown modality {name!r} (image or video)")
        try:
            out[name] = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"--limit-mm-per-prompt: {name}={value!r} is not an integer") from None
        if out[name] < 0:
            raise ValueError(f"--limit-mm-per-prompt: {name} must be >= 0")
    return out


def _split(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    engine_keys = {f.name for f in fields(EngineConfig)}
    server_keys = {f.name for f in fields(ServerConfig)}
    media_keys = {f.name for f in fields(MediaConfig)}
    eng, srv, med = {}, {}, {}
    for key, value in overrides.items():
        key = key.replace("-", "_")
        key = _MEDIA_ALIASES.get(key, key)
        if key in engine_keys:
            eng[key] = value
        elif key in server_keys:
            srv[key] = {**DEFAULT_MM_LIMITS, **parse_mm_limits(value)} if key == "limit_mm_per_prompt" else value
        elif key in media_keys:
            med[key] = tuple(value) if key == "allowed_media_domains" and value is not None else value
        else:
            raise ValueError(f"unknown config key {key!r}")
    return eng, srv, med


def build_config(yaml_path: str | Path | None = None, **overrides: Any) -> Config:
    """Defaults, then the YAML's keys, then `overrides` (CLI flags; None means unset)."""
    merged: dict[str, Any] = {}
    if yaml_path is not None:
        data = yaml.safe_load(Path(yaml_path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{yaml_path}: expected a mapping of config keys")
        data.pop("name", None)
        data.pop("description", None)
        merged.update(data)
    merged.update({k: v for k, v in overrides.items() if v is not None})
    eng, srv, med = _split(merged)
    return Config(
        engine=replace(EngineConfig(), **eng), server=replace(ServerConfig(), **srv), media=replace(MediaConfig(), **med)
    )
