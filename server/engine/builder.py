"""Build the engine from an EngineConfig, in two halves that may live in different processes:

- `build_frontend`: the family processor (chat template, tokenizer, image processor). No
  weights: this is all the API process needs.
- `build_core`: model weights, KV cache, runner and scheduler (the `EngineCore`). Runs where
  the step loop runs: the engine-core process (`core_client.ProcessCoreClient`) or, in thread
  mode and for the offline `LLM`, the caller's process.

`build_engine` builds both in this process (the offline `LLM`, `vlmserve bench`);
`core_client.build_core_client` builds what the server needs for its `engine_mode` (it imports
this module; this module imports no client).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from vlmserve import kernels
from vlmserve.config import EngineConfig
from vlmserve.engine import memory
from vlmserve.engine.engine_core import EngineCore
from vlmserve.engine.request import Request
from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.engine.scheduler import Scheduler
from vlmserve.models import registry
from vlmserve.models.loader import load_model, read_hf_config, resolve_model_dir
from vlmserve.multimodal.inputs import ProcessedPrompt
from vlmserve.models.layers.parallel import SINGLE
from vlmserve.runner.model_runner import kv_block_bytes
from vlmserve.runner.tensor_parallel import TPWorkers, make_runner, rank_device
from vlmserve.runner.grammar_vocab import load_tokenizer_info
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
    be built meanwhile, in another process (the engine-core process receives them by pipe).

    With `tensor_parallel_size` N > 1 this process is rank 0: it starts the N - 1 worker
    processes first (`runner/tensor_parallel.py`), and every runner built here is mirrored on
    them (the KV cache is sized here, once, for all ranks)."""
    kernels.set_backend(config.kernel_backend)
    torch.manual_seed(config.seed)
    hf_config = read_hf_config(model_dir)
    device = resolve_device(config.device)
    workers = None
    if config.tensor_parallel_size > 1:
        device = rank_device(device, 0)
        workers = TPWorkers(config, model_dir, device)
    try:
        return _build_core(config, model_dir, eos_token_ids, hf_config, device, workers)
    except BaseException:
        if workers is not None:
            workers.close()
        raise


def _build_core(
    config: EngineConfig, model_dir: Path, eos_token_ids: Callable[[], Iterable[int]], hf_config: dict[str, Any],
    device: torch.device, workers: TPWorkers | None,
) -> CoreParts:
    tp = workers.tp if workers is not None else SINGLE
    model, model_config = load_model(model_dir, dtype=config.dtype, device=device, tp=tp)
    dtype = next(model.parameters()).dtype

    max_model_len = context_length(config.max_model_len, model_config)
    block_bytes = kv_block_bytes(model, config.block_size, dtype)
    cross_block_bytes = kv_block_bytes(model, config.block_size, dtype, cross=True) if model.cross_kv_cache_spec else 0
    if config.num_kv_blocks is None and config.kv_cache_memory_gb is None and device.type == "cuda":
        mem = memory.CudaMemory(device)
        peak = memory.profile_activation_peak(
            mem, lambda: _profile_step(model, config, dtype, device, max_model_len, workers)
        )
        plan = memory.plan_kv_cache(mem, config.gpu_memory_utilization, peak, block_bytes, cross_block_bytes)
        logger.info("KV cache sized from device memory: %s", plan.describe())
        num_blocks, sized_cross_blocks = plan.num_blocks, plan.num_cross_blocks
    else:
        gib = config.kv_cache_memory_gb or 1.0
        num_blocks = config.num_kv_blocks or int(gib * 2**30) // block_bytes
        sized_cross_blocks = int(gib * 2**30 * 0.25) // cross_block_bytes if cross_block_bytes else 0
        if num_blocks < 2:
            raise ValueError(f"--kv-cache-memory-gb {gib} holds only {num_blocks} KV blocks; raise it")
    num_cross_blocks = 0
    if model.cross_kv_cache_spec is not None:
        # No cross-attention layers (a config may list none): blocks are bookkeeping only, free.
        num_cross_blocks = config.num_cross_kv_blocks or (max(2, sized_cross_blocks) if cross_block_bytes else 1 << 16)
    eos = frozenset(eos_token_ids())
    # Grammar masks need the same matcher state on every rank, and the workers keep none:
    # with tensor parallelism a constrained request is refused at admission (EngineCore).
    grammar = GrammarRuntime(lambda: load_tokenizer_info(model_dir, hf_config, eos)) if workers is None else None
    runner = make_runner(
        model,
        workers,
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


def _profile_step(
    model: Any, config: EngineConfig, dtype: torch.dtype, device: torch.device, max_model_len: int,
    workers: TPWorkers | None = None,
) -> int:
    """One step at the largest batch the config allows, over a throwaway KV cache just big
    enough: `max_num_batched_tokens` prompt tokens over up to `max_num_seqs` requests, each
    completing its prefill, so every row is sampled (on every rank, with `workers`). Returns the
    throwaway cache's bytes."""
    seqs = min(config.max_num_seqs, config.max_num_batched_tokens)
    num_blocks = memory.profile_blocks(config.max_num_batched_tokens, seqs, config.block_size)
    # No prefix caching: the dummy prompts must all be computed.
    profile_config = dataclasses.replace(config, enable_prefix_caching=False)
    runner = make_runner(model, workers, num_blocks=num_blocks, block_size=config.block_size, dtype=dtype,
                         device=device, eos_token_ids=frozenset(), seed=config.seed)
    core = EngineCore(Scheduler(profile_config, num_blocks, max_model_len), runner)
    base, extra = divmod(config.max_num_batched_tokens, seqs)
    for i in range(seqs):
        n = min(base + (i < extra), max_model_len - 1)
        core.add_request(Request(f"profile-{i}", ProcessedPrompt([(i + j) % 64 for j in range(n)]),
                                 SamplingParams(max_tokens=1, ignore_eos=True)))
    core.step()
    return num_blocks * kv_block_bytes(model, config.block_size, dtype)


def build_engine(config: EngineConfig) -> EngineParts:
    frontend = build_frontend(config)
    core = build_core(config, frontend.model_dir, lambda: frontend.processor.eos_token_ids)
    return EngineParts(core.core, frontend.processor, frontend.model_dir, core.max_model_len,
                       frontend.default_model_name)
