"""Our Qwen2-VL (paged KV cache, flattened batches, fused weights) against transformers'
`Qwen2VLForConditionalGeneration` on the same checkpoint, float32.

Tolerance: logits within 5e-5 absolute (+1e-5 relative); observed differences are ~1e-6,
from matmul order (fused q/k/v, Linear patch embedding instead of Conv3d).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from transformers import GenerationConfig
from transformers import Qwen2VLForConditionalGeneration as HFQwen2VL

from vlmserve import kernels
from vlmserve.models.loader import load_model
from vlmserve.models.qwen2_vl.config import Qwen2VLModelConfig
from vlmserve.models.qwen2_vl.image_processor import Qwen2VLImageProcessor
from vlmserve.models.qwen2_vl.model import Qwen2VLForConditionalGeneration
from vlmserve.models.qwen2_vl.processor import qwen2_vl_pixel_values
from vlmserve.models.qwen2_vl.video_processor import Qwen2VLVideoProcessor
from vlmserve.models.qwen2_vl.tiny import make_tiny_qwen2_vl
from vlmserve.multimodal.inputs import MultiModalItem
from vlmserve.runner.forward_batch import ForwardBatch

ATOL, RTOL = 5e-5, 1e-5
BLOCK_SIZE = 4
NUM_BLOCKS = 96
PATCH = 14  # both tiny checkpoints: patch 14, merge 2, temporal patch 2
LUTS = {"image": Qwen2VLImageProcessor().lut_array, "video": Qwen2VLVideoProcessor().lut_array}


@pytest.fixture(scope="module", params=["transformers_saved", "tiny_published"])
def models(request, make_hf_tiny, tmp_path_factory) -> tuple[Qwen2VLForConditionalGeneration, HFQwen2VL]:
    if request.param == "transformers_saved":
        ckpt = make_hf_tiny(seed=0)
    else:
        ckpt = make_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny_published"), seed=0)
    ours, _ = load_model(ckpt, dtype=torch.float32, device="cpu", progress=False)
    hf = HFQwen2VL.from_pretrained(ckpt, dtype=torch.float32).eval()
    return ours, hf


# --- prompts -----------------------------------------------------------------------------


@dataclass
class Prompt:
    ids: list[int]
    token_types: list[int]  # 0 text, 1 image, 2 video (transformers' mm_token_type_ids)
    items: list[MultiModalItem] = field(default_factory=list)
    hf_mm: dict[str, torch.Tensor] = field(default_factory=dict)


def build_prompt(cfg: Qwen2VLModelConfig, segments: list, seed: int) -> Prompt:
    """segments: an int n (n random text tokens) or ("image" | "video", (t, h, w)). Items carry
    random uint8 pixels, as the processor builds them; transformers gets their float rows."""
    gen = torch.Generator().manual_seed(seed)
    prompt = Prompt(ids=[], token_types=[])
    pixels: dict[str, list[torch.Tensor]] = {"image": [], "video": []}
    grids: dict[str, list[list[int]]] = {"image": [], "video": []}
    for seg in segments:
        if isinstance(seg, int):
            prompt.ids += torch.randint(1, 250, (seg,), generator=gen).tolist()
            prompt.token_types += [0] * seg
            continue
        modality, (t, h, w) = seg
        n = t * h * w // cfg.vision.spatial_merge_size**2
        pad = cfg.image_token_id if modality == "image" else cfg.video_token_id
        shape = (h * PATCH, w * PATCH, 3) if modality == "image" else (t * 2, h * PATCH, w * PATCH, 3)
        uint8 = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).numpy()
        prompt.ids.append(cfg.vision_start_token_id)
        prompt.token_types.append(0)
        item = MultiModalItem(
            modality=modality,
            content_hash=f"{modality}-{seed}-{len(prompt.items)}",
            offset=len(prompt.ids),
            length=n,
            data={"pixels": uint8, "grid_thw": (t, h, w), "lut": LUTS[modality], "patchify": (PATCH, 2, 2)},
        )
        prompt.items.append(item)
        pv = qwen2_vl_pixel_values(item)
        prompt.ids += [pad] * n + [cfg.vision_end_token_id]
        prompt.token_types += [1 if modality == "image" else 2] * n + [0]
        pixels[modality].append(pv)
        grids[modality].append([t, h, w])
    if pixels["image"]:
        prompt.hf_mm["pixel_values"] = torch.cat(pixels["image"])
        prompt.hf_mm["image_grid_thw"] = torch.tensor(grids["image"])
    if pixels["video"]:
        prompt.hf_mm["pixel_values_videos"] = torch.cat(pixels["video"])
        prompt.hf_mm["video_grid_thw"] = torch.tensor(grids["video"])
    return prompt


def hf_inputs(prompt: Prompt) -> dict[str, torch.Tensor]:
    ids = torch.tensor([prompt.ids])
    return dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=torch.tensor([prompt.token_types]),
        **prompt.hf_mm,
    )


def mrope_positions(hf: HFQwen2VL, prompt: Prompt) -> tuple[torch.Tensor, int]:
    """transformers' M-RoPE positions [3, L] and delta for the prompt."""
    inputs = hf_inputs(prompt)
    pos, delta = hf.model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
    )
    return pos[:, 0], int(delta.item())


def prompt_embeds(model: Qwen2VLForConditionalGeneration, prompt: Prompt) -> torch.Tensor:
    """Token embeddings with every item's vision rows merged at its placeholders: [L, H]."""
    embeds = model.embed_input_ids(torch.tensor(prompt.ids))
    if prompt.items:
        rows = model.embed_multimodal(prompt.items)
        for item, r in zip(prompt.items, rows):
            assert r.shape == (item.num_embeds, model.config.hidden_size)
        where = torch.cat([torch.arange(it.offset, it.offset + it.length) for it in prompt.items])
        kernels.merge_embeddings(embeds, torch.cat(rows), where)
    return embeds


# --- a paged KV cache driven by hand -------------------------------------------------------


class PagedKV:
    """Blocks handed out in a shuffled order, so no request's blocks are contiguous."""

    def __init__(self, model: Qwen2VLForConditionalGeneration, seed: int = 0) -> None:
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


def run_step(model, kv: PagedKV, chunks: list[tuple[str, int, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """chunks: (req_id, first position, embeds [n, H], positions [3, n]) → logits per chunk."""
    batch = kv.batch([(req, start, e.shape[0]) for req, start, e, _ in chunks])
    hidden = model.forward(torch.cat([c[2] for c in chunks]), torch.cat([c[3] for c in chunks], dim=1), batch)
    logits = model.compute_logits(hidden)
    assert logits.dtype == torch.float32
    return list(logits.split([c[2].shape[0] for c in chunks]))


# --- tests -------------------------------------------------------------------------------

PROMPTS = {
    "text_only": [11],
    "one_image": [5, ("image", (1, 4, 6)), 4],
    "two_images_interleaved": [3, ("image", (1, 4, 4)), 5, ("image", (1, 6, 2)), 2],
    "odd_size_image": [2, ("image", (1, 10, 6)), 3],  # 140 x 84 px: a 5 x 3 grid of merged tokens
    "video": [4, ("video", (2, 4, 6)), 3],
    "image_and_video": [2, ("image", (1, 2, 4)), 1, ("video", (3, 4, 2)), 2],
}


@pytest.mark.parametrize("name", list(PROMPTS))
@torch.inference_mode()
def test_prompt_logits_match_transformers(models, name: str) -> None:
    ours, hf = models
    prompt = build_prompt(ours.config, PROMPTS[name], seed=1)
    expected = hf(**hf_inputs(prompt)).logits[0]
    positions, _ = mrope_positions(hf, prompt)

    (logits,) = run_step(ours, PagedKV(ours), [("r", 0, prompt_embeds(ours, prompt), positions)])

    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=RTOL)


@torch.inference_mode()
def test_vision_rows_match_transformers_per_item_in_one_batch(models) -> None:
    ours, hf = models
    prompt = build_prompt(ours.config, PROMPTS["image_and_video"], seed=2)
    rows = ours.embed_multimodal(prompt.items)
    image = hf.model.get_image_features(prompt.hf_mm["pixel_values"], prompt.hf_mm["image_grid_thw"]).pooler_output
    video = hf.model.get_video_features(
        prompt.hf_mm["pixel_values_videos"], prompt.hf_mm["video_grid_thw"]
    ).pooler_output
    assert [r.shape[0] for r in rows] == [2, 6]  # t*h*w / 4
    torch.testing.assert_close(rows[0], image[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows[1], video[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["text_only", "one_image", "video"])
@torch.inference_mode()
def test_greedy_decode_through_paged_cache_matches_transformers_generate(models, name: str) -> None:
    ours, hf = models
    prompt = build_prompt(ours.config, PROMPTS[name], seed=3)
    # Explicit values: unset ones are filled from the checkpoint's generation_config.json
    # (the published one sets repetition_penalty 1.05).
    gen_cfg = GenerationConfig(
        max_new_tokens=8, do_sample=False, repetition_penalty=1.0, eos_token_id=None, pad_token_id=0
    )
    expected = hf.generate(**hf_inputs(prompt), generation_config=gen_cfg)[0, len(prompt.ids) :].tolist()
    assert len(expected) == 8

    positions, delta = mrope_positions(hf, prompt)
    kv = PagedKV(ours, seed=1)
    (logits,) = run_step(ours, kv, [("r", 0, prompt_embeds(ours, prompt), positions)])
    tokens = [int(logits[-1].argmax())]
    while len(tokens) < 8:
        index = len(prompt.ids) + len(tokens) - 1
        embeds = ours.embed_input_ids(torch.tensor(tokens[-1:]))
        (logits,) = run_step(ours, kv, [("r", index, embeds, torch.full((3, 1), index + delta))])
        tokens.append(int(logits[-1].argmax()))

    assert tokens == expected


@torch.inference_mode()
def test_requests_batched_together_give_the_same_logits_as_alone(models) -> None:
    ours, hf = models
    a = build_prompt(ours.config, PROMPTS["one_image"], seed=4)
    b = build_prompt(ours.config, [9, ("image", (1, 2, 2)), 6], seed=5)
    a_pos, a_delta = mrope_positions(hf, a)
    b_pos, _ = mrope_positions(hf, b)
    a_emb, b_emb = prompt_embeds(ours, a), prompt_embeds(ours, b)
    (a_alone,) = run_step(ours, PagedKV(ours), [("a", 0, a_emb, a_pos)])
    (b_alone,) = run_step(ours, PagedKV(ours), [("b", 0, b_emb, b_pos)])

    kv = PagedKV(ours, seed=2)
    # Step 1: A's whole prompt and B's first chunk; step 2: A decodes one token while B
    # prefills the rest of its prompt on top of the chunk already in the cache.
    a_step1, b_chunk1 = run_step(ours, kv, [("a", 0, a_emb, a_pos), ("b", 0, b_emb[:7], b_pos[:, :7])])
    next_token = int(a_step1[-1].argmax())
    n_a = len(a.ids)
    a_dec_emb = ours.embed_input_ids(torch.tensor([next_token]))
    a_dec_pos = torch.full((3, 1), n_a + a_delta)
    b_chunk2, a_decode = run_step(ours, kv, [("b", 7, b_emb[7:], b_pos[:, 7:]), ("a", n_a, a_dec_emb, a_dec_pos)])

    torch.testing.assert_close(a_step1, a_alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([b_chunk1, b_chunk2]), b_alone, atol=1e-5, rtol=1e-5)
    (a_full,) = run_step(
        ours, PagedKV(ours), [("a", 0, torch.cat([a_emb, a_dec_emb]), torch.cat([a_pos, a_dec_pos], dim=1))]
    )
    torch.testing.assert_close(a_decode[0], a_full[-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pixels": np.zeros((28, 56, 3), np.uint8)}, "pixels must be uint8 \\[56, 84, 3\\] for grid_thw \\(1, 4, 6\\)"),
        ({"pixels": np.zeros((56, 84, 3), np.float32)}, "pixels must be uint8"),
        ({"grid_thw": (2, 4, 6)}, "pixels must be uint8 \\[4, 56, 84, 3\\]|pixels must be uint8 \\[56, 84, 3\\]"),
        ({"patchify": (16, 2, 2)}, "the processor and model configs do not match"),
        ({"lut": np.zeros((3, 255), np.float32)}, "lut must be float32 \\[3, 256\\]"),
    ],
)
def test_embed_multimodal_explains_inconsistent_items(models, change, message) -> None:
    ours, _ = models
    (item,) = build_prompt(ours.config, [1, ("image", (1, 4, 6))], seed=4).items
    item.data.update(change)
    with pytest.raises(ValueError, match=message):
        ours.embed_multimodal([item])


# --- config variations transformers accepts ----------------------------------------------

CONFIG_VARIANTS = {
    # text_config.hidden_act / vision_config.hidden_act were once ignored (SiLU / quick GELU always).
    "activations": dict(text={"hidden_act": "gelu_pytorch_tanh"}, vision={"hidden_act": "gelu"}),
    # rope_type "linear" was once ignored: unscaled frequencies.
    "linear_rope": dict(text={"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4,
                                                  "mrope_section": [2, 3, 3]}}),
}


@pytest.mark.parametrize("variant", list(CONFIG_VARIANTS))
@torch.inference_mode()
def test_config_variant_prompt_logits_match_transformers(variant: str, tmp_path) -> None:
    from tests.models.conftest import save_random_hf_model, tiny_hf_config

    cfg = tiny_hf_config()
    for sub, values in CONFIG_VARIANTS[variant].items():
        for key, value in values.items():
            setattr(getattr(cfg, f"{sub}_config"), key, value)
    hf = HFQwen2VL(cfg).float().eval()
    ours, _ = load_model(save_random_hf_model(hf, tmp_path), dtype=torch.float32, device="cpu", progress=False)
    prompt = build_prompt(ours.config, PROMPTS["two_images_interleaved"], seed=3)
    expected = hf(**hf_inputs(prompt)).logits[0]
    positions, _ = mrope_positions(hf, prompt)

    (logits,) = run_step(ours, PagedKV(ours), [("r", 0, prompt_embeds(ours, prompt), positions)])

    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=RTOL)
