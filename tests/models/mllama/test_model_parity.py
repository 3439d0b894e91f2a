"""Our Mllama (paged self-attention cache, paged cross cache filled by `write_cross_kv`,
flattened batches) against transformers' `MllamaForConditionalGeneration`, float32.

Tolerance: logits within 1e-4 absolute (+1e-5 relative); observed <= 1.5e-5 (matmul order: fused
projections, Linear patch embedding instead of Conv2d, SDPA vs explicit softmax).
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from transformers import GenerationConfig
from transformers.models.mllama.processing_mllama import (
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

from vlmserve.models.mllama.processor import cross_row_positions, item_real_rows, mllama_pixel_values
from vlmserve.multimodal.inputs import ProcessedPrompt
from vlmserve.runner.forward_batch import CrossAttentionBatch, ForwardBatch
from tests.models.mllama.conftest import random_image

ATOL, RTOL = 1e-4, 1e-5
BLOCK = 8
NUM_BLOCKS = 256


def img(h, w, seed):
    return {"type": "image", "_pil": random_image(h, w, seed)}


def text(t):
    return {"type": "text", "text": t}


CASES = {
    "one_image": [{"role": "user", "content": [img(50, 100, 1), text("Describe this image.")]}],
    "two_images_separate": [
        {"role": "user", "content": [text("Compare"), img(60, 60, 2), text("with this one"), img(40, 150, 3), text("please")]}
    ],
    "two_images_consecutive": [{"role": "user", "content": [img(30, 90, 4), img(130, 70, 5), text("What is different?")]}],
    "text_only": [{"role": "user", "content": [text("Hello, tell me about the sky.")]}],
    "odd_sizes_full_tiles": [{"role": "user", "content": [img(97, 111, 6), text("Count the cats"), img(37, 201, 7)]}],
    "tiny_image": [{"role": "user", "content": [img(3, 2, 8), text("What color?")]}],
    "multi_turn": [
        {"role": "user", "content": [img(45, 80, 9), text("What is this?")]},
        {"role": "assistant", "content": [text("A dog on the left.")]},
        {"role": "user", "content": [text("And the sky?")]},
    ],
}


def render(processor, conversation) -> ProcessedPrompt:
    images = [c["_pil"] for m in conversation for c in m["content"] if "_pil" in c]
    clean = [{"role": m["role"], "content": [{k: v for k, v in c.items() if k != "_pil"} for c in m["content"]]}
             for m in conversation]
    return processor.render_chat(clean, images)


def hf_inputs(processor, prompt: ProcessedPrompt) -> dict[str, torch.Tensor]:
    ids = torch.tensor([prompt.prompt_token_ids])
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if not prompt.mm_items:
        return out
    n, tiles = len(prompt.mm_items), processor.max_num_tiles
    pv = torch.zeros(1, n, tiles, *mllama_pixel_values(prompt.mm_items[0]).shape[1:])
    ar_mask = torch.zeros(1, n, tiles, dtype=torch.long)
    ar_mask[..., 0] = 1
    for i, item in enumerate(prompt.mm_items):
        pv[0, i, : item.data["num_tiles"]] = mllama_pixel_values(item)
        ar_mask[0, i, : item.data["num_tiles"]] = 1
    sparse = [get_cross_attention_token_mask(prompt.prompt_token_ids, processor.image_token_id)]
    dense = convert_sparse_cross_attention_mask_to_dense(
        sparse, [[it.data["num_tiles"] for it in prompt.mm_items]], tiles, len(prompt.prompt_token_ids)
    )
    out.update(
        pixel_values=pv,
        aspect_ratio_ids=torch.tensor([[it.data["aspect_ratio_id"] for it in prompt.mm_items]]),
        aspect_ratio_mask=ar_mask,
        cross_attention_mask=torch.from_numpy(dense),
    )
    return out


class Caches:
    """Paged self-attention and cross caches, blocks handed out in a shuffled order; noise, not
    zeros, so a read of an unwritten slot shows in the logits."""

    def __init__(self, model, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)

        def pool(spec):
            shape = (NUM_BLOCKS, BLOCK, spec.num_kv_heads, spec.head_dim)
            return [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)) for _ in range(spec.num_layers)]

        self.model = model
        self.self_kv, self.cross_kv = pool(model.kv_cache_spec), pool(model.cross_kv_cache_spec)
        self.free = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
        self.tables: dict[str, list[int]] = {}
        self.cross_tables: dict[str, list[int]] = {}
        self.cross_lens: dict[str, int] = {}
        self.ranges: dict[str, np.ndarray] = {}

    def admit(self, req: str, prompt: ProcessedPrompt) -> None:
        """What the runner does at admission: encode the images and write the cross K/V rows
        (items' rows in item order, each at its cross position)."""
        rows = self.model.embed_multimodal(prompt.mm_items)
        n = sum(r.shape[0] for r in rows)
        self.cross_lens[req], self.ranges[req] = n, prompt.cross_ranges
        table = self.cross_tables.setdefault(req, [])
        while len(table) * BLOCK < n:
            table.append(self.free.pop())
        if n:
            vcfg = self.model.config.vision
            positions = cross_row_positions([item_real_rows(i, vcfg.num_patches) for i in prompt.mm_items], vcfg.rows_per_image)
            slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in positions.tolist()])
            self.model.write_cross_kv(torch.cat(rows), slots, self.cross_kv)

    def step(self, chunks: list[tuple[str, int, torch.Tensor]]) -> list[torch.Tensor]:
        """chunks: (req, first position, embeds [n, H]) → logits per chunk."""
        slots, starts, seq_lens, ranges = [], [0], [], []
        for req, start, e in chunks:
            n = e.shape[0]
            table = self.tables.setdefault(req, [])
            while len(table) * BLOCK < start + n:
                table.append(self.free.pop())
            slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, start + n)]
            starts.append(starts[-1] + n)
            seq_lens.append(start + n)
            r = self.ranges.get(req)
            # Generated tokens (past the prompt) take the last prompt token's range.
            ranges += [r[min(p, len(r) - 1)].tolist() if r is not None else [0, 0] for p in range(start, start + n)]
        reqs = [c[0] for c in chunks]

        def pad(tables):
            width = max(1, max(len(t) for t in tables))
            return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)

        cross_lens = [self.cross_lens.get(r, 0) for r in reqs]
        cross = None
        if any(cross_lens):
            cross = CrossAttentionBatch(
                kv_caches=self.cross_kv,
                block_tables=pad([self.cross_tables.get(r, []) for r in reqs]),
                seq_lens=torch.tensor(cross_lens, dtype=torch.int32),
                ranges=torch.tensor(ranges, dtype=torch.int32),
                seq_lens_cpu=cross_lens,
            )
        batch = ForwardBatch(
            num_reqs=len(chunks), num_tokens=starts[-1], query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=pad([self.tables[r] for r in reqs]),
            slot_mapping=torch.tensor(slots, dtype=torch.int64), max_query_len=max(c[2].shape[0] for c in chunks),
            max_seq_len=max(seq_lens), kv_caches=self.self_kv, query_start_loc_cpu=starts, seq_lens_cpu=seq_lens,
            cross=cross,
        )
        positions = torch.cat([torch.arange(s, s + e.shape[0]) for _, s, e in chunks])
        hidden = self.model.forward(torch.cat([c[2] for c in chunks]), positions, batch)
        return list(self.model.compute_logits(hidden).split([c[2].shape[0] for c in chunks]))


def embeds(model, ids) -> torch.Tensor:
    return model.embed_input_ids(torch.tensor(ids))


@pytest.mark.parametrize("name", list(CASES))
@torch.inference_mode()
def test_prompt_logits_match_transformers(mllama_models, mllama_processor, name: str) -> None:
    ours, hf = mllama_models
    prompt = render(mllama_processor, CASES[name])
    expected = hf(**hf_inputs(mllama_processor, prompt)).logits[0]

    caches = Caches(ours)
    caches.admit("r", prompt)
    (logits,) = caches.step([("r", 0, embeds(ours, prompt.prompt_token_ids))])

    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", ["one_image", "two_images_consecutive", "text_only", "multi_turn"])
@torch.inference_mode()
def test_greedy_decode_through_paged_caches_matches_transformers_generate(
    mllama_models, mllama_processor, name: str
) -> None:
    ours, hf = mllama_models
    prompt = render(mllama_processor, CASES[name])
    cfg = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = hf.generate(**hf_inputs(mllama_processor, prompt), generation_config=cfg)[0, len(prompt.prompt_token_ids):]
    assert len(expected) == 8 and len(set(expected.tolist())) > 1  # not a degenerate repeat

    caches = Caches(ours, seed=1)
    caches.admit("r", prompt)
    n = len(prompt.prompt_token_ids)
    (logits,) = caches.step([("r", 0, embeds(ours, prompt.prompt_token_ids))])
    tokens = [int(logits[-1].argmax())]
    while len(tokens) < 8:
        (logits,) = caches.step([("r", n + len(tokens) - 1, embeds(ours, tokens[-1:]))])
        tokens.append(int(logits[-1].argmax()))

    assert tokens == expected.tolist()


@torch.inference_mode()
def test_image_and_text_only_requests_in_one_batch_give_their_logits_alone(mllama_models, mllama_processor) -> None:
    ours, _ = mllama_models
    a = render(mllama_processor, CASES["two_images_separate"])
    b = render(mllama_processor, CASES["text_only"])
    alone = {}
    for req, prompt in (("a", a), ("b", b)):
        caches = Caches(ours)
        caches.admit(req, prompt)
        (alone[req],) = caches.step([(req, 0, embeds(ours, prompt.prompt_token_ids))])

    caches = Caches(ours, seed=2)
    caches.admit("a", a)
    caches.admit("b", b)
    cut = a.mm_items[0].offset  # A's first chunk is all before its first image: empty ranges
    a1, b_all = caches.step([("a", 0, embeds(ours, a.prompt_token_ids[:cut])), ("b", 0, embeds(ours, b.prompt_token_ids))])
    nb = len(b.prompt_token_ids)
    b_next = int(b_all[-1].argmax())
    b_dec, a2 = caches.step([("b", nb, embeds(ours, [b_next])), ("a", cut, embeds(ours, a.prompt_token_ids[cut:]))])

    torch.testing.assert_close(torch.cat([a1, a2]), alone["a"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b_all, alone["b"], atol=1e-5, rtol=1e-5)
    caches_b = Caches(ours)
    caches_b.admit("b", b)
    (b_full,) = caches_b.step([("b", 0, embeds(ours, b.prompt_token_ids + [b_next]))])
    torch.testing.assert_close(b_dec[0], b_full[-1], atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_images_change_the_logits(mllama_models, mllama_processor) -> None:
    """The cross layers matter in the tiny model: another image gives other logits."""
    ours, _ = mllama_models
    conv = CASES["one_image"]
    other = [{"role": "user", "content": [img(50, 100, 99), text("Describe this image.")]}]
    out = []
    for c in (conv, other):
        prompt = render(mllama_processor, c)
        caches = Caches(ours)
        caches.admit("r", prompt)
        out.append(caches.step([("r", 0, embeds(ours, prompt.prompt_token_ids))])[0])
    assert (out[0][-1] - out[1][-1]).abs().max() > 1e-2


# --- config variations transformers accepts ----------------------------------------------

CONFIG_VARIANTS = {
    # Once ignored (SiLU / exact GELU always, unscaled "linear" RoPE) or refused (a negative
    # intermediate layer index, which transformers reads from the end).
    "activations_rope_negative_index": dict(
        text={"hidden_act": "gelu_pytorch_tanh", "rope_parameters": {"rope_type": "linear", "factor": 4.0,
                                                                      "rope_theta": 1e4}},
        vision={"hidden_act": "quick_gelu", "intermediate_layers_indices": [-1, 0], "vision_output_dim": 96},
    ),
    # No cross-attention layer at all: building the engine once divided by a zero cross block size.
    "no_cross_layers": dict(text={"cross_attention_layers": [], "num_hidden_layers": 3}, vision={}),
}


def _variant_checkpoint(mllama_ckpt, variant: str, tmp_path):
    import json

    from transformers import MllamaConfig
    from transformers import MllamaForConditionalGeneration as HFMllama

    from tests.models.conftest import save_random_hf_model

    d = json.loads((mllama_ckpt / "config.json").read_text())
    for sub, values in CONFIG_VARIANTS[variant].items():
        d[f"{sub}_config"].update(values)
    d.pop("torch_dtype")
    hf = HFMllama(MllamaConfig(**d)).float().eval()
    return hf, save_random_hf_model(hf, tmp_path, files_from=mllama_ckpt)


@pytest.mark.parametrize("variant", list(CONFIG_VARIANTS))
@torch.inference_mode()
def test_config_variant_prompt_logits_match_transformers(mllama_ckpt, variant: str, tmp_path) -> None:
    import json

    from vlmserve.models.loader import load_model
    from vlmserve.models.mllama.processor import MllamaProcessor

    hf, ckpt = _variant_checkpoint(mllama_ckpt, variant, tmp_path)
    ours, _ = load_model(ckpt, dtype=torch.float32, device="cpu", progress=False)
    processor = MllamaProcessor(ckpt, json.loads((ckpt / "config.json").read_text()))
    prompt = render(processor, CASES["two_images_separate"])
    expected = hf(**hf_inputs(processor, prompt)).logits[0]

    caches = Caches(ours)
    caches.admit("r", prompt)
    (logits,) = caches.step([("r", 0, embeds(ours, prompt.prompt_token_ids))])

    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=RTOL)


def test_engine_without_cross_layers_sizes_its_cross_cache_and_serves_images(mllama_ckpt, tmp_path) -> None:
    from vlmserve.engine.sampling_params import SamplingParams
    from tests.utils import make_llm

    hf, ckpt = _variant_checkpoint(mllama_ckpt, "no_cross_layers", tmp_path)
    llm = make_llm(ckpt, num_kv_blocks=None, kv_cache_memory_gb=0.01)  # cross blocks sized from memory
    prompt = render(llm.processor, CASES["one_image"])
    (ours,) = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    with torch.inference_mode():
        expected = hf.generate(**hf_inputs(llm.processor, prompt), max_new_tokens=4, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
    assert ours.token_ids == expected[0, len(prompt.prompt_token_ids):].tolist()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("size", [(50, 100), (3, 2), (97, 111), (400, 400)])
@torch.inference_mode()
def test_uint8_canvas_crosses_and_tiles_normalised_beside_the_tower_equal_transformers(
    mllama_models, mllama_processor, mllama_ckpt, backend, size
) -> None:
    # The canvas is padded with level 0 before normalising (as transformers pads), so padding
    # normalises to (0 - mean) / std: an image smaller than its canvas checks that.
    import pickle

    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    from vlmserve import kernels

    ours, _ = mllama_models
    image = random_image(*size, seed=11 + sum(size))
    conversation = [{"role": "user", "content": [{"type": "image"}, text("Describe it.")]}]
    (item,) = mllama_processor.render_chat(conversation, [image]).mm_items
    item = pickle.loads(pickle.dumps(item))  # what the engine core receives through its pipe
    assert "pixel_values" not in item.data and item.data["pixels"].dtype == np.uint8
    n = item.data["num_tiles"]
    expected = MllamaImageProcessorPil.from_pretrained(mllama_ckpt)(images=[[image]], return_tensors="np")
    want = torch.from_numpy(np.asarray(expected["pixel_values"][0, 0, :n]))
    kernels.set_backend(backend)  # "triton": the interpreter here, compiled on a GPU
    assert torch.equal(ours._tiles(item).cpu(), want)
    assert torch.equal(mllama_pixel_values(item), want)
