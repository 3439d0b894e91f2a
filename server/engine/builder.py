"""Build the engine from an EngineConfig, in two halves that may live in different processes:

- `build_frontend`: the family processor (chat template, tokenizer, image processor). No
  weights: this is all the API process needs.
- `build_core`: model weights, KV cache, runner and scheduler (the `EngineCore`). Runs where
  the step loop runs: the engine-core process (`core_client.ProcessCoreClient`) or, in thread
  mode and for the offline `LLM`, the caller's process.

`build_engine` builds both in this process (the offline `LLM`, `vlmserve bench`);
`build_core_client` builds what the server needs for its `engine_mode`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from vlmserve import kernels
from vlmserve.config import EngineConfig
from vlmserve.engine.core_client import CoreClient, ProcessCoreClient, ThreadCoreClient
from vlmserve.engine.engine_core import EngineCore
from vlmserve.engine.scheduler import Scheduler
from vlmserve.models import registry
from vlmserve.models.loader import load_model, read_hf_config, resolve_model_dir
from vlmserve.runner.grammar_vocab import load_tokenizer_info
from vlmserve.runner.model_runner import ModelRunner, kv_block_bytes
from vlmserve.runner.structured import GrammarRuntime

logger = logging.getLogger(__name__)


@dataclass
class FrontendParts:
    processor: Any
    model_dir: Path  # resolved: a hub repo id is downloaded here first
    default_model_name: str


@dataclass
class CoreParts:
    core: EngineCore
    max_model_len: int
    num_kv_blocks: int


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


def context_length(requested: int | None, model_config: Any) -> int:
    """The engine's max_model_len: `requested` (--max-model-len) or the checkpoint's
    max_position_embeddings, kept within a sliding-window model's window, the span over which
    full attention (all we implement) equals sliding-window attention."""
    window = getattr(model_config, "sliding_window", None)
    if window is not None and requested is not None and requested > window:
        raise ValueError(
            f"--max-model-len {requested} exceeds this model's sliding_window {window}: sliding-window attention "
            f"is not implemented, and full attention matches it only up to {window} tokens; pass "
            f"--max-model-len {window} or less"
        )
    length = requested or model_config.max_position_embeddings
    return length if window is None else min(length, window)


def build_frontend(config: EngineConfig, model_dir: Path | None = None) -> FrontendParts:
    """`model_dir`: the already resolved checkpoint directory (None: resolve `config.model`)."""
    model_dir = model_dir or resolve_model_dir(config.model)
    hf_config = read_hf_config(model_dir)
    family = registry.family_for_config(hf_config)
    processor = family.processor_class()(
        model_dir, hf_config, min_pixels=config.min_pixels, max_pixels=config.max_pixels
    )
    name = config.model if not Path(config.model).exists() else model_dir.name
    return FrontendParts(processor, model_dir, name)


def build_core(config: EngineConfig, model_dir: Path, eos_token_ids: Callable[[], Iterable[int]]) -> CoreParts:
    """`eos_token_ids` is called once the weights are loaded: the processor that knows them may
    be built meanwhile, in another process (the engine-core process receives them by pipe)."""
    kernels.set_backend(config.kernel_backend)
    torch.manual_seed(config.seed)
    hf_config = read_hf_config(model_dir)
    device = resolve_device(config.device)
    model, model_config = load_model(model_dir, dtype=config.dtype, device=device)
    dtype = next(model.parameters()).dtype

    max_model_len = context_length(config.max_model_len, model_config)
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
        cross_block_bytes = kv_block_bytes(model, config.block_size, dtype, cross=True)
        # No cross-attention layers (a config may list none): blocks are bookkeeping only, free.
        budget = int(config.kv_cache_memory_gb * 2**30 * 0.25) // cross_block_bytes if cross_block_bytes else 1 << 16
        num_cross_blocks = config.num_cross_kv_blocks or max(2, budget)
    eos = frozenset(eos_token_ids())
    grammar = GrammarRuntime(lambda: load_tokenizer_info(model_dir, hf_config, eos))
    runner = ModelRunner(
        model,
        num_blocks=num_blocks,
        block_size=config.block_size,
        dtype=dtype,
        device=device,
        eos_token_ids=eos,
        seed=config.seed,
        num_cross_blocks=num_cross_blocks,
        grammar=grammar,
    )
    scheduler = Scheduler(config, num_blocks, max_model_len, num_cross_kv_blocks=num_cross_blocks)
    logger.info(
        "engine ready: %s on %s (%s), %d KV blocks x %d tokens, context %d",
        hf_config.get("architectures", ["?"])[0], device, dtype, num_blocks, config.block_size, max_model_len,
    )
    return CoreParts(EngineCore(scheduler, runner), max_model_len, num_blocks)


def build_engine(config: EngineConfig) -> EngineParts:
    frontend = build_frontend(config)
    core = build_core(config, frontend.model_dir, lambda: frontend.processor.eos_token_ids)
    return EngineParts(core.core, frontend.processor, frontend.model_dir, core.max_model_len,
                       frontend.default_model_name)


def build_core_client(config: EngineConfig) -> tuple[CoreClient, FrontendParts]:
    """The server's engine, per `config.engine_mode`, not yet started. Process mode spawns the
    engine-core process first: it imports torch and loads the weights while this process
    builds the processor (then sends it the EOS ids, the one thing the core needs from it)."""
    if config.engine_mode == "thread":
        frontend = build_frontend(config)
        parts = build_core(config, frontend.model_dir, lambda: frontend.processor.eos_token_ids)
        return ThreadCoreClient(parts.core, parts.max_model_len, parts.num_kv_blocks), frontend
    model_dir = resolve_model_dir(config.model)  # a hub download happens once, here
    client = ProcessCoreClient(config, model_dir)
    try:
        frontend = build_frontend(config, model_dir)
    except BaseException:
        client.shutdown()
        raise
    client.send_init(frontend.processor.eos_token_ids)
    return client, frontend
