"""ModelRunner: executes one SchedulerOutput as one forward pass.

Per step: drop finished/preempted request state, add new requests, apply block diffs,
encode the scheduled images, build the flattened batch (no padding), embed tokens, merge
image rows at their placeholders, run the model over the paged KV cache, sample the rows
whose prefill is complete or that decode. Owns the KV cache tensors and the encoder cache.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from vlmserve import kernels
from vlmserve.engine.outputs import RunnerOutput, SchedulerOutput
from vlmserve.models.interfaces import VLModel
from vlmserve.runner.encoder_runner import EncoderRunner
from vlmserve.runner.forward_batch import CrossAttentionBatch, ForwardBatch
from vlmserve.runner.input_batch import BatchInputs, CachedRequestState, build_inputs
from vlmserve.runner.sampler import Sampler
from vlmserve.runner.structured import GrammarRuntime

logger = logging.getLogger(__name__)


def kv_block_bytes(model: VLModel, block_size: int, dtype: torch.dtype, cross: bool = False) -> int:
    spec = model.cross_kv_cache_spec if cross else model.kv_cache_spec
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * elem


class ModelRunner:
    def __init__(
        self,
        model: VLModel,
        *,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        eos_token_ids: frozenset[int],
        seed: int = 0,
        num_cross_blocks: int = 0,
        grammar: GrammarRuntime | None = None,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.dtype = dtype
        self.device = device
        spec = model.kv_cache_spec
        shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(spec.num_layers)
        ]
        self.cross_kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        cross = model.cross_kv_cache_spec
        if num_cross_blocks:
            cshape = (num_cross_blocks, block_size, cross.num_kv_heads, cross.head_dim)
            self.cross_kv_caches = [
                (torch.zeros(cshape, dtype=dtype, device=device), torch.zeros(cshape, dtype=dtype, device=device))
                for _ in range(cross.num_layers)
            ]
        self.encoder = EncoderRunner(model)
        self.sampler = Sampler(eos_token_ids, seed=seed, device=device)
        self.requests: dict[str, CachedRequestState] = {}
        # Structured outputs; None: a request with `structured` set fails its step.
        self.grammar = grammar
        self.num_forward_passes = 0
        logger.info("KV cache: %d blocks of %d tokens (%s)", num_blocks, block_size, shape)

    def _update_states(self, out: SchedulerOutput) -> None:
        for req_id in out.finished_req_ids | out.preempted_req_ids:
            st = self.requests.pop(req_id, None)
            if st is not None:
                self.sampler.release(st)
            if self.grammar is not None:
                self.grammar.drop(req_id)  # rebuilt from the tokens so far if it comes back
        self.encoder.free(out.free_encoder_hashes)
        for new in out.scheduled_new_reqs:
            self.requests[new.req_id] = CachedRequestState(
                req_id=new.req_id,
                token_ids=list(new.token_ids),
                num_prompt_tokens=new.num_prompt_tokens,
                mm_items=new.mm_items,
                sampling_params=new.sampling_params,
                block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens,
                mrope_positions=new.mrope_positions,
                mrope_delta=new.mrope_delta,
                cross_block_ids=list(new.cross_block_ids),
                cross_ranges=new.cross_ranges,
                cross_row_positions=new.cross_row_positions,
                num_cross_rows=sum(item.cross_attn_tokens for item in new.mm_items) if new.cross_block_ids else 0,
            )
        cached = out.scheduled_cached_reqs
        for req_id, new_blocks, computed in zip(cached.req_ids, cached.new_block_ids, cached.num_computed_tokens):
            st = self.requests[req_id]
            st.block_ids.extend(new_blocks)
            st.num_computed_tokens = computed

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        self._update_states(out)
        if out.total_num_scheduled_tokens == 0:
            return RunnerOutput(req_ids=[], sampled_token_ids={})

        if out.scheduled_encoder_inputs:
            items = [self.requests[r].mm_items[i] for r, idxs in out.scheduled_encoder_inputs.items() for i in idxs]
            self.encoder.encode(items)
        for new in out.scheduled_new_reqs:
            if new.cross_block_ids:
                self._write_cross_kv(self.requests[new.req_id])

        order = list(out.num_scheduled_tokens)
        inputs = build_inputs(order, out.num_scheduled_tokens, self.requests, self.block_size, self.model.uses_mrope)
        hidden = self._forward(inputs)
        self.num_forward_passes += 1

        sampled: dict[str, list[int]] = {r: [] for r in order}
        logprobs = {}
        grammar_finished: set[str] = set()
        grammar_failed: set[str] = set()
        if inputs.sampling_req_ids:
            logits = self.model.compute_logits(hidden[torch.from_numpy(inputs.logits_indices).to(self.device)])
            states = [self.requests[r] for r in inputs.sampling_req_ids]
            constrained = self._constrain(logits, states)
            tokens, token_logprobs = self.sampler(logits, states, inplace=True)
            for st, tok, lp in zip(states, tokens, token_logprobs):
                st.token_ids.append(tok)
                sampled[st.req_id] = [tok]
                if lp is not None:
                    logprobs[st.req_id] = [lp]
            if constrained:
                grammar_finished, grammar_failed = self.grammar.accept(states, tokens)  # type: ignore[union-attr]
        for req_id in order:
            self.requests[req_id].num_computed_tokens += out.num_scheduled_tokens[req_id]
        return RunnerOutput(req_ids=order, sampled_token_ids=sampled, logprobs=logprobs,
                            grammar_finished=grammar_finished, grammar_failed=grammar_failed)

    def _constrain(self, logits: torch.Tensor, states: list[CachedRequestState]) -> bool:
        """Masks the constrained rows of `logits` [B, V] in place; False when none is."""
        if not any(st.sampling_params.structured is not None for st in states):
            return False
        if self.grammar is None:
            raise RuntimeError("a request has structured output but this runner has no grammar runtime")
        self.grammar.apply(logits, states)
        return True

    def _write_cross_kv(self, st: CachedRequestState) -> None:
        """Once per admission: the request's encoder rows → its cross-attention K/V blocks."""
        rows = torch.cat(
            [self.encoder.rows(it.content_hash, 0, it.cross_attn_tokens) for it in st.mm_items if it.cross_attn_tokens]
        )
        pos = st.cross_row_positions if st.cross_row_positions is not None else np.arange(rows.shape[0])
        blocks = np.asarray(st.cross_block_ids, dtype=np.int64)
        slots = blocks[pos // self.block_size] * self.block_size + pos % self.block_size
        slots = torch.from_numpy(slots).to(self.device)
        self.model.write_cross_kv(rows, slots, self.cross_kv_caches)

    def _forward(self, inputs: BatchInputs) -> torch.Tensor:
        dev = self.device
        batch = ForwardBatch(
            num_reqs=len(inputs.req_ids),
            num_tokens=inputs.num_tokens,
            query_start_loc=torch.from_numpy(inputs.query_start_loc).to(dev),
            seq_lens=torch.from_numpy(inputs.seq_lens).to(dev),
            block_tables=torch.from_numpy(inputs.block_tables).to(dev),
            slot_mapping=torch.from_numpy(inputs.slot_mapping).to(dev),
            max_query_len=int((inputs.query_start_loc[1:] - inputs.query_start_loc[:-1]).max()),
            max_seq_len=int(inputs.seq_lens.max()),
            kv_caches=self.kv_caches,
            query_start_loc_cpu=inputs.query_start_loc.tolist(),
            seq_lens_cpu=inputs.seq_lens.tolist(),
        )
        batch.attn_plan = kernels.plan_paged_attention(
            batch.block_tables, batch.seq_lens, batch.query_start_loc, self.block_size,
            batch.query_start_loc_cpu, batch.seq_lens_cpu,
        )
        if inputs.cross is not None:
            c = inputs.cross
            batch.cross = CrossAttentionBatch(
                kv_caches=self.cross_kv_caches,
                block_tables=torch.from_numpy(c.block_tables).to(dev),
                seq_lens=torch.from_numpy(c.seq_lens).to(dev),
                ranges=torch.from_numpy(c.ranges).to(dev),
                seq_lens_cpu=c.seq_lens.tolist(),
            )
        input_ids = torch.from_numpy(inputs.input_ids).to(dev)
        positions = torch.from_numpy(inputs.positions).to(dev)
        embeds = self.model.embed_input_ids(input_ids)
        if inputs.mm_slices:
            rows = torch.cat([self.encoder.rows(s.content_hash, s.row_start, s.row_end) for s in inputs.mm_slices])
            dest = torch.from_numpy(np.concatenate([s.dest for s in inputs.mm_slices])).to(dev)
            kernels.merge_embeddings(embeds, rows, dest)
        return self.model.forward(embeds, positions, batch)

