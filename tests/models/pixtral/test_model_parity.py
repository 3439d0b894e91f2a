"""Our Pixtral (paged KV cache, flattened batches, fused weights) against transformers'
`LlavaForConditionalGeneration` (Pixtral vision tower) on the same tiny checkpoint, float32.

Prompts come from our processor (HF format); transformers gets the same ids and the same
pixels (padded into one batch, with `image_sizes`). Tolerance: logits within 5e-5 absolute
(+1e-5 relative); observed differences are ~1e-6 (matmul order: fused q/k/v and gate/up,
Linear patch embedding instead of Conv2d).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration

from vlmserve.engine.builder import context_length
from vlmserve.models.loader import load_model
from vlmserve.models.pixtral.config import PixtralModelConfig
from vlmserve.models.pixtral.model import PixtralForConditionalGeneration
from vlmserve.models.pixtral.processor import PixtralProcessor, pixtral_pixel_values
from vlmserve.multimodal.inputs import ProcessedPrompt
from tests.models.conftest import save_random_hf_model
from tests.models.pixtral.conftest import CHATS, chat_images
from tests.models.pixtral.paged import PagedKV, greedy_decode, prompt_embeds, run_step

ATOL, RTOL = 5e-5, 1e-5
DECODE_STEPS = 6


@pytest.fixture(scope="module")
def hf(tiny_hf) -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration.from_pretrained(tiny_hf, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours(tiny_hf) -> PixtralForConditionalGeneration:
    return load_model(tiny_hf, dtype=torch.float32, device="cpu", progress=False)[0]


@pytest.fixture(scope="module")
def processor(tiny_hf) -> PixtralProcessor:
    import json

    return PixtralProcessor(tiny_hf, json.loads((tiny_hf / "config.json").read_text()))


def hf_inputs(prompt: ProcessedPrompt) -> dict[str, torch.Tensor]:
    ids = torch.tensor([prompt.prompt_token_ids])
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if prompt.mm_items:
        pixels = [pixtral_pixel_values(item) for item in prompt.mm_items]
        h = max(p.shape[1] for p in pixels)
        w = max(p.shape[2] for p in pixels)
        batch = torch.zeros(len(pixels), 3, h, w)  # zero padding, as transformers' processor pads
        for i, p in enumerate(pixels):
            batch[i, :, : p.shape[1], : p.shape[2]] = p
        out["pixel_values"] = batch
        out["image_sizes"] = torch.tensor([list(p.shape[1:]) for p in pixels])
    return out


@pytest.mark.parametrize("name", list(CHATS))
@torch.inference_mode()
def test_prompt_logits_match_transformers(ours, hf, processor, name: str) -> None:
    conversation, _ = CHATS[name]
    prompt = processor.render_chat(conversation, chat_images(name))
    expected = hf(**hf_inputs(prompt)).logits[0]

    (logits,) = run_step(ours, PagedKV(ours), [("r", 0, prompt_embeds(ours, prompt))])

    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", list(CHATS))
@torch.inference_mode()
def test_greedy_decode_through_paged_cache_matches_transformers_generate(ours, hf, processor, name: str) -> None:
    conversation, _ = CHATS[name]
    prompt = processor.render_chat(conversation, chat_images(name))
    gen_cfg = GenerationConfig(max_new_tokens=DECODE_STEPS, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = hf.generate(**hf_inputs(prompt), generation_config=gen_cfg)[0, len(prompt.prompt_token_ids) :]

    tokens = greedy_decode(ours, prompt, DECODE_STEPS)

    assert tokens == expected.tolist()
    assert len(set(tokens)) > 1, "a degenerate tiny model would make this comparison vacuous"


@torch.inference_mode()
def test_vision_rows_of_several_images_in_one_batch_match_transformers_per_image(ours, hf, processor) -> None:
    prompt = processor.render_chat(CHATS["multi_turn"][0], chat_images("multi_turn"))
    rows = ours.embed_multimodal(prompt.mm_items)
    for item, got in zip(prompt.mm_items, rows):
        pv = pixtral_pixel_values(item)
        want = hf.model.get_image_features(
            pv[None], image_sizes=torch.tensor([list(pv.shape[1:])]),
            vision_feature_layer=-1, vision_feature_select_strategy="full",
        ).pooler_output[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_transformers5_weight_names_load_to_the_same_model(ours, hf, processor, tmp_path) -> None:
    hf.save_pretrained(tmp_path)  # model.vision_tower.*, model.language_model.*, lm_head.weight
    reloaded, _ = load_model(tmp_path, dtype=torch.float32, device="cpu", progress=False)
    for (name, a), (_, b) in zip(ours.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name", ["two_images", "odd_size", "multi_turn"])
@torch.inference_mode()
def test_mistral_format_checkpoint_gives_the_same_logits_as_the_hf_one(ours, tiny_mistral, processor, name) -> None:
    mistral, config = load_model(tiny_mistral, dtype=torch.float32, device="cpu", progress=False)
    assert config.weight_format == "mistral"
    prompt = processor.render_chat(CHATS[name][0], chat_images(name))

    (expected,) = run_step(ours, PagedKV(ours), [("r", 0, prompt_embeds(ours, prompt))])
    (logits,) = run_step(mistral, PagedKV(mistral), [("r", 0, prompt_embeds(mistral, prompt))])

    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_requests_batched_together_give_the_same_logits_as_alone(ours, processor) -> None:
    a = processor.render_chat(CHATS["one_image"][0], chat_images("one_image"))
    b = processor.render_chat(CHATS["odd_size"][0], chat_images("odd_size"))
    a_emb, b_emb = prompt_embeds(ours, a), prompt_embeds(ours, b)
    (a_alone,) = run_step(ours, PagedKV(ours), [("a", 0, a_emb)])
    (b_alone,) = run_step(ours, PagedKV(ours), [("b", 0, b_emb)])

    kv = PagedKV(ours, seed=2)
    # Step 1: A's whole prompt and B's first chunk (ending inside its image); step 2: B's rest.
    a_step, b_chunk1 = run_step(ours, kv, [("a", 0, a_emb), ("b", 0, b_emb[:40])])
    (b_chunk2,) = run_step(ours, kv, [("b", 40, b_emb[40:])])

    torch.testing.assert_close(a_step, a_alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([b_chunk1, b_chunk2]), b_alone, atol=1e-5, rtol=1e-5)


# --- config variations transformers accepts ----------------------------------------------

CONFIG_VARIANTS = {
    # Once refused: a list of feature layers (concatenated), other projector/vision activations,
    # no projector bias.
    "vision_and_projector": dict(
        top={"vision_feature_layer": [-1, 0], "projector_hidden_act": "silu", "multimodal_projector_bias": False},
        vision={"hidden_act": "silu"},
    ),
    # Once ignored (SiLU, unscaled RoPE) or refused (MistralConfig's default sliding_window 4096).
    "text": dict(top={}, text={"hidden_act": "gelu", "sliding_window": 4096,
                               "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
}


def _variant_config(tiny_hf, variant: str) -> dict:
    spec = CONFIG_VARIANTS[variant]
    d = json.loads((tiny_hf / "config.json").read_text())
    d.update(spec["top"])
    d["text_config"].update(spec.get("text", {}))
    d["vision_config"].update(spec.get("vision", {}))
    d.pop("torch_dtype")
    return d


def _variant_checkpoint(tiny_hf, variant: str, tmp_path):
    hf = LlavaForConditionalGeneration(LlavaConfig(**_variant_config(tiny_hf, variant))).float().eval()
    return hf, save_random_hf_model(hf, tmp_path, files_from=tiny_hf)


@pytest.mark.parametrize("variant", list(CONFIG_VARIANTS))
@torch.inference_mode()
def test_config_variant_prompt_logits_match_transformers(tiny_hf, variant: str, tmp_path) -> None:
    hf, ckpt = _variant_checkpoint(tiny_hf, variant, tmp_path)
    ours, _ = load_model(ckpt, dtype=torch.float32, device="cpu", progress=False)
    processor = PixtralProcessor(ckpt, json.loads((ckpt / "config.json").read_text()))
    prompt = processor.render_chat(CHATS["two_images"][0], chat_images("two_images"))
    expected = hf(**hf_inputs(prompt)).logits[0]

    (logits,) = run_step(ours, PagedKV(ours), [("r", 0, prompt_embeds(ours, prompt))])

    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=RTOL)


def test_sliding_window_caps_the_context_at_the_window(tiny_hf) -> None:
    """Full attention equals sliding-window attention only within the window."""
    cfg = PixtralModelConfig.from_hf_config(_variant_config(tiny_hf, "text"))
    assert cfg.sliding_window == 4096 < cfg.max_position_embeddings
    assert context_length(None, cfg) == 4096
    assert context_length(2048, cfg) == 2048
    with pytest.raises(ValueError, match="--max-model-len 4096 or less"):
        context_length(8192, cfg)
