"""The shared golden NVLM-D fixtures (`../shared/fixtures/golden/nvlm_d`, beside the repo) and a
single-request forward pass through the paged KV cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlmserve import kernels
from vlmserve.multimodal.inputs import ProcessedPrompt
from vlmserve.runner.forward_batch import ForwardBatch

GOLDEN = Path(__file__).parents[3] / ".." / "shared" / "fixtures" / "golden" / "nvlm_d"
CASES = ("case1", "case2")


def golden_dir() -> Path:
    if not (GOLDEN / "README.md").is_file():
        pytest.fail(f"the NVLM-D golden fixtures are missing: expected them at {GOLDEN.resolve()}")
    return GOLDEN


@pytest.fixture(scope="session")
def golden() -> Path:
    return golden_dir()


def case_inputs(case: str) -> tuple[Image.Image, str]:
    """(RGB image, question without the `<image>` mark) of a golden case."""
    conv = json.loads((golden_dir() / "inputs" / "conversations.json").read_text())
    (entry,) = [c for c in conv["cases"] if c["name"] == case]
    question = entry["question"]
    assert question.startswith("<image>\n")
    image = Image.open(golden_dir() / "inputs" / entry["image"]).convert("RGB")
    return image, question[len("<image>\n") :]


def golden_processor(case: str) -> dict[str, np.ndarray]:
    return dict(np.load(golden_dir() / "golden" / f"{case}_processor.npz"))


def golden_summary(case: str) -> dict:
    return json.loads((golden_dir() / "golden" / "summary.json").read_text())[case]


def user_turn(question: str) -> dict:
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}


class PagedKV:
    """One request's paged cache, its blocks handed out in a shuffled order, caches filled
    with noise (a read of a slot never written shows up in the logits)."""

    def __init__(self, model, num_tokens: int, block_size: int = 16, seed: int = 0) -> None:
        spec = model.kv_cache_spec
        gen = torch.Generator().manual_seed(seed)
        self.block_size = block_size
        num_blocks = num_tokens // block_size + 2
        shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        self.caches = [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)) for _ in range(spec.num_layers)]
        self.table = torch.randperm(num_blocks, generator=gen).tolist()

    def batch(self, start: int, n: int) -> ForwardBatch:
        b = self.block_size
        slots = [self.table[p // b] * b + p % b for p in range(start, start + n)]
        return ForwardBatch(
            num_reqs=1,
            num_tokens=n,
            query_start_loc=torch.tensor([0, n], dtype=torch.int32),
            seq_lens=torch.tensor([start + n], dtype=torch.int32),
            block_tables=torch.tensor([self.table], dtype=torch.int32),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            max_query_len=n,
            max_seq_len=start + n,
            kv_caches=self.caches,
            query_start_loc_cpu=[0, n],
            seq_lens_cpu=[start + n],
        )

    def step(self, model, start: int, embeds: torch.Tensor) -> torch.Tensor:
        """Float32 logits [n, vocab] of `embeds` at positions start..start+n-1."""
        n = embeds.shape[0]
        hidden = model.forward(embeds, torch.arange(start, start + n), self.batch(start, n))
        return model.compute_logits(hidden)


def prompt_embeds(model, prompt: ProcessedPrompt) -> torch.Tensor:
    """Token embeddings with each item's encoder rows merged at its `is_embed` positions."""
    embeds = model.embed_input_ids(torch.tensor(prompt.prompt_token_ids))
    if prompt.mm_items:
        rows = model.embed_multimodal(prompt.mm_items)
        where = [item.offset + torch.from_numpy(np.flatnonzero(item.is_embed)) for item in prompt.mm_items]
        kernels.merge_embeddings(embeds, torch.cat(rows), torch.cat(where))
    return embeds
