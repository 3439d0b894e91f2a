"""Build an EngineCore (model, KV cache, runner, scheduler) and the family's processor
from an EngineConfig. Used by the server, the offline LLM API and the benchmark."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import kernels
from server.config import EngineConfig
from server.engine.engine_core import EngineCore
from server.engine.scheduler import Scheduler
from server.models import registry
from server.models.loader import load_model, read_hf_config, resolve_model_dir
from server.runner.model_runner import ModelRunner, kv_block_bytes

logger = logging.getLogger(__name__)


@dataclass
class EngineParts:
    core: EngineCore
    processor: Any
    model_dir: Path
    max_model_len: int
    default_model_name: str


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_engine(config: EngineConfig) -> EngineParts:
    kernels.set_backend(config.kernel_backend)
    torch.manual_seed(config.seed)
    model_dir = resolve_model_dir(config.model)
    hf_config = read_hf_config(model_dir)
    device = resolve_device(config.device)
    family = registry.family_for_config(hf_config)
    model, model_config = load_model(model_dir, dtype=config.dtype, device=device)
    dtype = next(model.parameters()).dtype
    processor = family.processor_class()(
        model_dir, hf_config, min_pixels=config.min_pixels, max_pixels=config.max_pixels
    )

    max_model_len = config.max_model_len or model_config.max_position_embeddings
    if config.num_kv_blocks is not None:
        num_blocks = config.num_kv_blocks
    else:
        num_blocks = int(config.kv_cache_memory_gb * 2**30) // kv_block_bytes(model, config.block_size, dtype)
    if num_blocks < 2:
        raise ValueError(
            f"--kv-cache-memory-gb {config.kv_cache_memory_gb} holds only {num_blocks} KV blocks; raise it"
        )
    num_cross_blocks = 0
    if model.cross_kv_cache_spec is not None:
        num_cross_blocks = config.num_cross_kv_blocks or max(
            2, int(config.kv_cache_memory_gb * 2**30 * 0.25) // kv_block_bytes(model, config.block_size, dtype, cross=True)
        )
    runner = ModelRunner(
        model,
        num_blocks=num_blocks,
        block_size=config.block_size,
        dtype=dtype,
        device=device,
        eos_token_ids=frozenset(processor.eos_token_ids),
        seed=config.seed,
        num_cross_blocks=num_cross_blocks,
    )
    scheduler = Scheduler(config, num_blocks, max_model_len, num_cross_kv_blocks=num_cross_blocks)
    logger.info(
        "engine ready: %s on %s (%s), %d KV blocks x %d tokens, context %d",
        hf_config.get("architectures", ["?"])[0], device, dtype, num_blocks, config.block_size, max_model_len,
    )
    name = config.model if not Path(config.model).exists() else model_dir.name
    return EngineParts(EngineCore(scheduler, runner), processor, model_dir, max_model_len, name)
