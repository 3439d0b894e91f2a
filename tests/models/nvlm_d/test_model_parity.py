"""Our NVLM-D (dummy heads stripped, fused weights, paged KV cache) against the official code's
outputs in the golden fixtures, float32: every prompt logit within 1e-4 (the README's
tolerance; observed ~1e-5), every greedy token exact, each decode step's logits too; then
through the whole engine, the same tokens and chat()'s (stripped) response."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmserve import kernels
from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.kernels import reference
from vlmserve.kernels.normalize_patchify import normalize_patchify
from vlmserve.models.loader import load_model, read_hf_config
from vlmserve.models.nvlm_d.processor import NVLMDProcessor
from tests.models.nvlm_d.conftest import CASES, PagedKV, case_inputs, golden_summary, prompt_embeds, user_turn
from tests.utils import make_llm

ATOL, RTOL = 1e-4, 1e-4
STEPS = 8


@pytest.fixture(scope="module")
def model(golden):
    return load_model(golden / "checkpoint", dtype=torch.float32, device="cpu", progress=False)[0]


@pytest.fixture(scope="module")
def processor(golden) -> NVLMDProcessor:
    return NVLMDProcessor(golden / "checkpoint", read_hf_config(golden / "checkpoint"))


def _golden_outputs(golden, case: str) -> dict[str, torch.Tensor]:
    return load_file(str(golden / "golden" / f"{case}_outputs.safetensors"))


@pytest.mark.parametrize("case", CASES)
def test_prompt_logits_and_greedy_decode_equal_the_official_model(model, processor, golden, case):
    img, question = case_inputs(case)
    prompt = processor.render_chat([user_turn(question)], [img])
    want = _golden_outputs(golden, case)
    n = len(prompt.prompt_token_ids)
    assert want["logits"].shape[0] == n
    kv = PagedKV(model, n + STEPS)
    with torch.inference_mode():
        logits = kv.step(model, 0, prompt_embeds(model, prompt))
        torch.testing.assert_close(logits, want["logits"], atol=ATOL, rtol=RTOL)
        tokens, step_logits = [int(logits[-1].argmax())], [logits[-1]]
        while len(tokens) < STEPS:
            step = kv.step(model, n + len(tokens) - 1, model.embed_input_ids(torch.tensor(tokens[-1:])))
            step_logits.append(step[-1])
            tokens.append(int(step[-1].argmax()))
    assert tokens == want["generated_ids"].tolist() == golden_summary(case)["chat_generated_ids"]
    torch.testing.assert_close(torch.stack(step_logits), want["generate_logits"], atol=ATOL, rtol=RTOL)


def test_engine_serves_chat_response_from_the_fixture_checkpoint(golden):
    llm = make_llm(golden / "checkpoint", block_size=16, num_kv_blocks=400, max_num_batched_tokens=512)
    prompts = []
    for case in CASES:
        img, question = case_inputs(case)
        prompts.append(llm.render_chat([user_turn(question)], [img]))
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=STEPS))
    for case, prompt, out in zip(CASES, prompts, outs):
        summary = golden_summary(case)
        assert len(prompt.prompt_token_ids) == summary["input_ids_len"]
        assert out.token_ids == summary["chat_generated_ids"]
        assert out.text == summary["chat_response"]  # chat(): decode, skip specials, strip


def test_tiles_normalise_on_the_device_path_as_on_the_cpu(processor):
    # The Triton kernel (interpreted here) over stacked tiles, against the reference and the
    # card's pixel_values patchified as the Conv2d patch embedding reads them.
    img, _ = case_inputs("case2")
    tiles = processor.image_processor.tiles(img)[:, :56, :84]  # a crop keeps the interpreter quick
    pixels = torch.from_numpy(tiles.copy())
    lut = processor.image_processor.lut
    got = normalize_patchify(pixels, lut, 14, 1, 1, "patches")
    assert torch.equal(got, reference.normalize_patchify(pixels, lut, 14, 1, 1, "patches"))
    pv = processor.image_processor.pixel_values(tiles)  # [T, 3, 56, 84]
    t = pv.shape[0]
    conv_order = pv.reshape(t, 3, 4, 14, 6, 14).permute(0, 2, 4, 1, 3, 5).reshape(t * 24, 3 * 14 * 14)
    assert torch.equal(got, conv_order)
    assert torch.equal(kernels.normalize_patchify(pixels, lut, 14, 1, 1, "patches"), got)


def test_nonzero_dummy_heads_are_refused_at_load(golden, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(golden / "checkpoint", ckpt)
    weights = load_file(str(ckpt / "model.safetensors"))
    name = "vision_model.encoder.layers.1.attn.proj.weight"
    weights[name] = weights[name].clone()
    weights[name][:, -1] = 0.5  # a dummy head's output column
    (ckpt / "model.safetensors").unlink()
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{name}: the dummy heads' output columns"):
        load_model(ckpt, dtype=torch.float32, progress=False)
