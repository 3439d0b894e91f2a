"""cos/sin tables of the shared rotary layer against transformers' Qwen2-VL modules."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding, Qwen2VLVisionRotaryEmbedding
from transformers.vision_utils import get_vision_position_ids

from vlmserve.models.layers.rotary import (
    mrope_cos_sin,
    rope_cos_sin,
    rope_inv_freq,
    vision_patch_positions,
    vision_rotary_cos_sin,
)


@pytest.mark.parametrize(
    "head_dim,mrope_section,theta",
    [(16, [2, 3, 3], 10000.0), (32, [4, 6, 6], 1e6), (128, [16, 24, 24], 1e6)],
)
def test_mrope_cos_sin_match_transformers_for_random_positions(
    head_dim: int, mrope_section: list[int], theta: float
) -> None:
    heads = 4
    config = Qwen2VLTextConfig(
        hidden_size=head_dim * heads,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": mrope_section},
    )
    hf = Qwen2VLRotaryEmbedding(config)
    gen = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 5000, (3, 37), generator=gen)
    hf_cos, hf_sin = hf(torch.zeros(1, dtype=torch.float32), positions.unsqueeze(1))  # [1, T, D]

    cos, sin = mrope_cos_sin(positions, rope_inv_freq(head_dim, theta), mrope_section)

    assert cos.shape == (37, head_dim // 2)
    # HF duplicates the D/2 table for the rotate-half layout; both halves equal ours.
    torch.testing.assert_close(cos, hf_cos[0, :, : head_dim // 2], rtol=0, atol=1e-6)
    torch.testing.assert_close(cos, hf_cos[0, :, head_dim // 2 :], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, hf_sin[0, :, : head_dim // 2], rtol=0, atol=1e-6)


def test_mrope_with_equal_axes_is_plain_rope() -> None:
    inv_freq = rope_inv_freq(16, 10000.0)
    pos = torch.arange(20)
    cos3, sin3 = mrope_cos_sin(pos.expand(3, -1), inv_freq, [2, 3, 3])
    cos1, sin1 = rope_cos_sin(pos, inv_freq)
    cos_flat, _ = mrope_cos_sin(pos, inv_freq, [2, 3, 3])
    torch.testing.assert_close(cos3, cos1, rtol=0, atol=0)
    torch.testing.assert_close(sin3, sin1, rtol=0, atol=0)
    torch.testing.assert_close(cos_flat, cos1, rtol=0, atol=0)


def test_mrope_section_not_matching_head_dim_is_rejected() -> None:
    with pytest.raises(ValueError, match="must sum to 8"):
        mrope_cos_sin(torch.zeros(3, 4, dtype=torch.long), rope_inv_freq(16, 1e4), [2, 2, 2])


@pytest.mark.parametrize("grids", [[(1, 4, 6)], [(1, 2, 2), (2, 6, 4), (1, 8, 2)]])
def test_vision_patch_positions_follow_transformers_merge_window_order(grids: list[tuple[int, int, int]]) -> None:
    ours = vision_patch_positions(grids, merge_size=2)
    theirs = get_vision_position_ids(torch.tensor(grids), 2)
    torch.testing.assert_close(ours, theirs.long(), rtol=0, atol=0)


def test_vision_rotary_cos_sin_match_transformers() -> None:
    config = Qwen2VLVisionConfig(embed_dim=64, num_heads=2)  # head_dim 32
    hf = Qwen2VLVisionRotaryEmbedding(config)
    grids = [(1, 6, 4), (2, 4, 4)]
    hw = vision_patch_positions(grids, merge_size=2)
    hf_cos, hf_sin = hf(torch.zeros(1), hw)  # [N, D]

    cos, sin = vision_rotary_cos_sin(hw, rope_inv_freq(16, 10000.0))

    assert cos.shape == (hw.shape[0], 16)
    torch.testing.assert_close(cos, hf_cos[:, :16], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, hf_sin[:, :16], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, hf_sin[:, 16:], rtol=0, atol=1e-6)
