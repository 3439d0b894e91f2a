"""SchedulerOutput + the runner's per-request state → the flat host-side inputs of one step.

Pure: numpy only, no torch, no device. `model_runner.py` uploads the arrays and builds the
`ForwardBatch`. Requests appear in the order of `SchedulerOutput.num_scheduled_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.multimodal.inputs import MultiModalItem


@dataclass
class CachedRequestState:
    """The runner's copy of a running request. `token_ids` grows by the sampled tokens."""

    req_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    mm_items: list[MultiModalItem]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    mrope_positions: np.ndarray | None = None  # [3, num_prompt_tokens]
    mrope_delta: int = 0
    cross_block_ids: list[int] = field(default_factory=list)
    cross_ranges: np.ndarray | None = None  # int32 [num_prompt_tokens, 2]
    cross_row_positions: np.ndarray | None = None  # int64 [num_cross_rows]
    num_cross_rows: int = 0
    # Owned by the Sampler: the request's sampling constants and device-state handle, built
    # when it first samples (a fresh state after preemption starts without).
    sampler_state: object = field(default=None, repr=False, compare=False)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]


@dataclass
class MultiModalSlice:
    """Rows [row_start, row_end) of the encoder output of `content_hash` go to the batch
    token indices `dest` (int64)."""

    content_hash: str
    row_start: int
    row_end: int
    dest: np.ndarray


@dataclass
class BatchInputs:
    req_ids: list[str]
    input_ids: np.ndarray  # int64 [T]
    positions: np.ndarray  # int64 [T] or [3, T]
    slot_mapping: np.ndarray  # int64 [T]
    query_start_loc: np.ndarray  # int32 [B + 1]
    seq_lens: np.ndarray  # int32 [B]
    block_tables: np.ndarray  # int32 [B, max_blocks]
    # Batch rows whose last scheduled token completes the known sequence: they sample.
    sampling_req_ids: list[str] = field(default_factory=list)
    logits_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    mm_slices: list[MultiModalSlice] = field(default_factory=list)
    # Cross-attention families, when any request of the step has images (else None).
    cross: "CrossInputs | None" = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class CrossInputs:
    block_tables: np.ndarray  # int32 [B, max_cross_blocks]
    seq_lens: np.ndarray  # int32 [B]: cross rows of each request (0: text only)
    ranges: np.ndarray  # int32 [T, 2]: the rows each token attends to


def _cross_ranges(state: CachedRequestState, start: int, end: int) -> np.ndarray:
    """Prompt tokens take their own range; generated tokens the last prompt token's."""
    out = np.empty((end - start, 2), dtype=np.int32)
    table = state.cross_ranges
    n_prompt_part = max(0, min(end, state.num_prompt_tokens) - start)
    out[:n_prompt_part] = table[start : start + n_prompt_part]
    out[n_prompt_part:] = table[state.num_prompt_tokens - 1]
    return out


def _build_cross(order: list[str], states: dict[str, CachedRequestState], qsl: np.ndarray) -> CrossInputs | None:
    if not any(states[r].num_cross_rows for r in order):
        return None
    width = max(max(len(states[r].cross_block_ids) for r in order), 1)
    block_tables = np.zeros((len(order), width), dtype=np.int32)
    seq_lens = np.zeros(len(order), dtype=np.int32)
    ranges = np.zeros((int(qsl[-1]), 2), dtype=np.int32)
    for i, req_id in enumerate(order):
        st = states[req_id]
        if not st.num_cross_rows:
            continue
        block_tables[i, : len(st.cross_block_ids)] = st.cross_block_ids
        seq_lens[i] = st.num_cross_rows
        lo, hi = int(qsl[i]), int(qsl[i + 1])
        ranges[lo:hi] = _cross_ranges(st, st.num_computed_tokens, st.num_computed_tokens + hi - lo)
    return CrossInputs(block_tables, seq_lens, ranges)


def _positions(state: CachedRequestState, start: int, end: int, uses_mrope: bool) -> np.ndarray:
    idx = np.arange(start, end, dtype=np.int64)
    if not uses_mrope:
        return idx
    out = np.empty((3, end - start), dtype=np.int64)
    n_prompt_part = max(0, min(end, state.num_prompt_tokens) - start)
    if n_prompt_part:
        if state.mrope_positions is None:
            out[:, :n_prompt_part] = idx[:n_prompt_part]
        else:
            out[:, :n_prompt_part] = state.mrope_positions[:, start : start + n_prompt_part]
    # Generated tokens advance all three axes together, offset by the prompt's delta.
    out[:, n_prompt_part:] = idx[n_prompt_part:] + state.mrope_delta
    return out


def _mm_slices(state: CachedRequestState, start: int, end: int, batch_offset: int) -> list[MultiModalSlice]:
    slices = []
    for item in state.mm_items:
        lo, hi = max(start, item.offset), min(end, item.offset + item.length)
        if lo >= hi:
            continue
        rel = np.arange(lo - item.offset, hi - item.offset)
        if item.is_embed is not None:
            rel = rel[item.is_embed[rel]]
            if rel.size == 0:
                continue
        row_start = item.embeds_before(lo)
        dest = rel + item.offset - start + batch_offset
        slices.append(MultiModalSlice(item.content_hash, row_start, row_start + rel.size, dest.astype(np.int64)))
    return slices


def build_inputs(
    order: list[str],
    num_scheduled: dict[str, int],
    states: dict[str, CachedRequestState],
    block_size: int,
    uses_mrope: bool,
) -> BatchInputs:
    """`states[...].num_computed_tokens` is the count before this step."""
    num_reqs = len(order)
    counts = np.array([num_scheduled[r] for r in order], dtype=np.int64)
    query_start_loc = np.zeros(num_reqs + 1, dtype=np.int32)
    np.cumsum(counts, out=query_start_loc[1:])
    total = int(query_start_loc[-1])

    input_ids = np.empty(total, dtype=np.int64)
    positions = np.empty((3, total) if uses_mrope else total, dtype=np.int64)
    slot_mapping = np.empty(total, dtype=np.int64)
    seq_lens = np.empty(num_reqs, dtype=np.int32)
    max_blocks = max((len(states[r].block_ids) for r in order), default=1)
    block_tables = np.zeros((num_reqs, max(max_blocks, 1)), dtype=np.int32)
    sampling_req_ids: list[str] = []
    logits_indices: list[int] = []
    mm_slices: list[MultiModalSlice] = []

    hi = 0
    for i, req_id in enumerate(order):
        st = states[req_id]
        start, n = st.num_computed_tokens, num_scheduled[req_id]
        end = start + n
        lo, hi = hi, hi + n
        if end > len(st.token_ids):
            raise RuntimeError(f"{req_id}: scheduled up to token {end} but only {len(st.token_ids)} are known")
        if n == 1 and start >= st.num_prompt_tokens:
            # A decode: scalar writes (numpy per-call overhead dominates at one token).
            input_ids[lo] = st.token_ids[start]
            if uses_mrope:
                positions[:, lo] = start + st.mrope_delta
            else:
                positions[lo] = start
            slot_mapping[lo] = st.block_ids[start // block_size] * block_size + start % block_size
        else:
            input_ids[lo:hi] = st.token_ids[start:end]
            if uses_mrope:
                positions[:, lo:hi] = _positions(st, start, end, True)
            else:
                positions[lo:hi] = np.arange(start, end)
            blocks = np.asarray(st.block_ids, dtype=np.int64)
            pos = np.arange(start, end, dtype=np.int64)
            slot_mapping[lo:hi] = blocks[pos // block_size] * block_size + pos % block_size
        seq_lens[i] = end
        block_tables[i, : len(st.block_ids)] = st.block_ids
        if end == len(st.token_ids):
            sampling_req_ids.append(req_id)
            logits_indices.append(hi - 1)
        if st.mm_items:
            mm_slices.extend(_mm_slices(st, start, end, lo))

    return BatchInputs(
        cross=_build_cross(order, states, query_start_loc),
        req_ids=list(order),
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slot_mapping,
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        block_tables=block_tables,
        sampling_req_ids=sampling_req_ids,
        logits_indices=np.asarray(logits_indices, dtype=np.int64),
        mm_slices=mm_slices,
    )
