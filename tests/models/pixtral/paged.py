"""A paged KV cache driven by hand (as in the Qwen2-VL parity test), for 1-D positions."""

from __future__ import annotations

import torch

from vlmserve import kernels
from vlmserve.multimodal.inputs import ProcessedPrompt
from vlmserve.runner.forward_batch import ForwardBatch

BLOCK_SIZE = 4
NUM_BLOCKS = 160


class PagedKV:
    """Blocks handed out in a shuffled order, so no request's blocks are contiguous."""

    def __init__(self, model, seed: int = 0) -> None:
        spec = model.kv_cache_spec
        gen = torch.Generator().manual_seed(seed)
        shape = (NUM_BLOCKS, BLOCK_SIZE, spec.num_kv_heads, spec.head_dim)
        # Noise, not zeros: a read of a slot never written would show up in the logits.
        self.caches = [
            (torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)) for _ in range(spec.num_layers)
        ]
        self.free = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
        self.tables: dict[str, list[int]] = {}

    def batch(self, chunks: list[tuple[str, int, int]]) -> ForwardBatch:
        """chunks: (req_id, first position, number of tokens), in batch order."""
        slots, starts, seq_lens = [], [0], []
        for req, start, n in chunks:
            table = self.tables.setdefault(req, [])
            while len(table) * BLOCK_SIZE < start + n:
                table.append(self.free.pop())
            slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, start + n)]
            starts.append(starts[-1] + n)
            seq_lens.append(start + n)
        width = max(len(self.tables[req]) for req, _, _ in chunks)
        tables = [self.tables[req] + [0] * (width - len(self.tables[req])) for req, _, _ in chunks]
        return ForwardBatch(
            num_reqs=len(chunks),
            num_tokens=starts[-1],
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=torch.tensor(tables, dtype=torch.int32),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            max_query_len=max(n for _, _, n in chunks),
            max_seq_len=max(seq_lens),
            kv_caches=self.caches,
            query_start_loc_cpu=starts,
            seq_lens_cpu=seq_lens,
        )


def run_step(model, kv: PagedKV, chunks: list[tuple[str, int, torch.Tensor]]) -> list[torch.Tensor]:
    """chunks: (req_id, first position, embeds [n, H]) → float32 logits per chunk."""
    batch = kv.batch([(req, start, e.shape[0]) for req, start, e in chunks])
    positions = torch.cat([torch.arange(start, start + e.shape[0]) for _, start, e in chunks])
    hidden = model.forward(torch.cat([c[2] for c in chunks]), positions, batch)
    logits = model.compute_logits(hidden)
    assert logits.dtype == torch.float32
    return list(logits.split([c[2].shape[0] for c in chunks]))


def prompt_embeds(model, prompt: ProcessedPrompt) -> torch.Tensor:
    """Token embeddings with each item's encoder rows merged at its `is_embed` positions: [L, H]."""
    embeds = model.embed_input_ids(torch.tensor(prompt.prompt_token_ids))
    if prompt.mm_items:
        rows = model.embed_multimodal(prompt.mm_items)
        where = []
        for item, r in zip(prompt.mm_items, rows):
            assert r.shape == (item.num_embeds, model.config.hidden_size)
            where.append(item.offset + torch.from_numpy(item.is_embed.nonzero()[0]))
        kernels.merge_embeddings(embeds, torch.cat(rows), torch.cat(where))
    return embeds


def greedy_decode(model, prompt: ProcessedPrompt, steps: int, seed: int = 1) -> list[int]:
    """Prefill the prompt, then decode one token per step through the paged cache."""
    kv = PagedKV(model, seed=seed)
    (logits,) = run_step(model, kv, [("r", 0, prompt_embeds(model, prompt))])
    tokens = [int(logits[-1].argmax())]
    while len(tokens) < steps:
        index = len(prompt.prompt_token_ids) + len(tokens) - 1
        (logits,) = run_step(model, kv, [("r", index, model.embed_input_ids(torch.tensor(tokens[-1:])))])
        tokens.append(int(logits[-1].argmax()))
    return tokens
