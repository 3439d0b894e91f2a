"""Our Molmo v1 against the official remote code's outputs (the golden fixtures): processor
outputs within the README's tolerances, all prompt logits and every greedy step's logits within
1e-4 through the paged KV cache, greedy tokens and prompt lengths exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tests.models.pixtral.paged as paged
from vlmserve.models.loader import load_model
from vlmserve.models.molmo.image_processor import reference_crops
from vlmserve.models.molmo.processor import MolmoProcessor
from tests.models.molmo.conftest import (CHECKPOINT, case_conversation, case_image, case_outputs, case_processor,
                                         cases, golden_dir)

CASES = [c["name"] for c in json.loads((CHECKPOINT.parent / "inputs" / "conversations.json").read_text())["cases"]] \
    if (CHECKPOINT / "config.json").is_file() else ["fixtures-missing"]
ATOL = RTOL = 1e-4


@pytest.fixture(scope="module")
def processor() -> MolmoProcessor:
    golden_dir()
    return MolmoProcessor(CHECKPOINT, json.loads((CHECKPOINT / "config.json").read_text()))


@pytest.fixture(scope="module")
def model():
    golden_dir()
    return load_model(CHECKPOINT, dtype=torch.float32, device="cpu", progress=False)[0]


def _case(name: str) -> dict:
    return next(c for c in cases() if c["name"] == name)


def official_arrays(processor: MolmoProcessor, prompt) -> dict[str, np.ndarray]:
    """Our prompt in the official processor's output form (input_ids, images, image_input_idx,
    image_masks)."""
    (item,) = prompt.mm_items
    plan = item.data["plan"]
    positions = item.offset + np.flatnonzero(item.is_embed)
    rows = plan["feature_rows"]
    return {
        "input_ids": np.asarray(prompt.prompt_token_ids),
        "images": reference_crops(item.data["pixels"], plan, processor.image_processor).numpy(),
        "image_input_idx": np.where(rows >= 0, positions[np.maximum(rows, 0)], -100),
        "image_masks": plan["image_masks"],
    }


@pytest.mark.parametrize("name", CASES)
def test_processor_outputs_match_the_official_processor(processor, name):
    case = _case(name)
    golden = case_processor(case)
    ours = official_arrays(processor, processor.render_chat(case_conversation(case), [case_image(case)]))
    assert ours["input_ids"].tolist() == golden["input_ids"].tolist()
    assert ours["images"].shape == golden["images"].shape
    np.testing.assert_allclose(ours["images"], golden["images"], rtol=0, atol=1e-5)
    assert ours["image_input_idx"].tolist() == golden["image_input_idx"].tolist()
    np.testing.assert_array_equal(ours["image_masks"], golden["image_masks"])


def test_text_only_prompt_is_bos_then_the_role_formatted_text(processor):
    # The official processor appends " User: {text} Assistant:" after the image blocks: the
    # golden prompts end with it, so a text-only prompt is BOS followed by that tail.
    case = cases()[0]
    golden = case_processor(case)["input_ids"].tolist()
    end = max(i for i, t in enumerate(golden) if t == processor.token_ids["im_end"])
    prompt = processor.render_chat([{"role": "user", "content": case["text"]}], [])
    assert prompt.prompt_token_ids == [golden[0], *golden[end + 1 :]]
    assert golden[0] == processor.bos_token_id == processor.tokenizer.eos_token_id
    assert prompt.mm_items == []


@pytest.mark.parametrize("name", CASES)
def test_prompt_and_greedy_logits_match_the_official_model(processor, model, name, monkeypatch):
    monkeypatch.setattr(paged, "NUM_BLOCKS", 400)  # 1600 slots: room for the 642-token prompt
    case = _case(name)
    golden = case_outputs(case)
    prompt = processor.render_chat(case_conversation(case), [case_image(case)])
    assert len(prompt.prompt_token_ids) == golden["logits"].shape[0]
    steps = golden["generated_ids"].numel()
    with torch.no_grad():
        kv = paged.PagedKV(model)
        (logits,) = paged.run_step(model, kv, [("r", 0, paged.prompt_embeds(model, prompt))])
        torch.testing.assert_close(logits, golden["logits"], atol=ATOL, rtol=RTOL)
        tokens, step_logits = [int(logits[-1].argmax())], [logits[-1]]
        while len(tokens) < steps:
            index = len(prompt.prompt_token_ids) + len(tokens) - 1
            (out,) = paged.run_step(model, kv, [("r", index, model.embed_input_ids(torch.tensor(tokens[-1:])))])
            tokens.append(int(out[-1].argmax()))
            step_logits.append(out[-1])
    assert tokens == golden["generated_ids"].tolist()
    torch.testing.assert_close(torch.stack(step_logits), golden["generate_logits"], atol=ATOL, rtol=RTOL)


def test_triton_resize_patchify_reproduces_the_official_crops(processor):
    # The device path (Triton; the interpreter on CPU) against the official `images`: the
    # global crop and the first high-res crop of case 1, within the README's 1e-5.
    from vlmserve.kernels.resize_patchify import resize_patchify
    from vlmserve.models.molmo.image_processor import LEVELS, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, writable

    case = cases()[0]
    golden = case_processor(case)["images"]
    pixels = np.asarray(case_image(case).convert("RGB"), dtype=np.uint8)
    plan = processor.image_processor.plan(*pixels.shape[:2], processor.token_ids)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t = lambda a: torch.from_numpy(writable(a)).to(dev)  # noqa: E731
    ip = processor.image_processor
    for key, crop, want in (("global", 0, golden[0]), ("tiled", 0, golden[1])):
        rp = plan[key]
        got = resize_patchify(t(pixels), t(LEVELS), t(rp.y_starts), t(rp.y_weights), t(rp.x_starts), t(rp.x_weights),
                              torch.tensor(OPENAI_CLIP_MEAN, device=dev), torch.tensor(OPENAI_CLIP_STD, device=dev),
                              t(rp.origins[crop : crop + 1]), rp.place, ip.crop_size, ip.image_patch_size)
        np.testing.assert_allclose(got[0].cpu().numpy(), want, rtol=0, atol=1e-5)
