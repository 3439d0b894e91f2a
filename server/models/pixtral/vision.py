"""The Pixtral vision tower (`PixtralVisionModel`) and the Llava projector.

Per image: Conv2d patch embedding (patch P, no bias) over its own (rows x cols) grid →
RMSNorm `ln_pre` → pre-norm transformer layers (2-D RoPE attention, gated MLP). Every image
of a call runs in one flattened batch [sum(rows * cols), E]; attention stays within each image
(one `cu_seqlens` segment per image), which is what transformers' block-diagonal mask does.

2-D RoPE, in the rotate-half layout `kernels.rotary` takes: with inv_freq[j] = theta^(-2j/D)
for j < D/2 (D the head dim), a patch at (row h, col w) has the D/2 angles
    [h * inv_freq[0::2], w * inv_freq[1::2]]        (D/4 row slots, then D/4 column slots).
This is transformers' `PixtralVisionRotaryEmbedding` (its "H-W" recomposition, duplicated over
both halves) and the original complex-number form (freqs_h from even, freqs_w from odd
frequencies) once q/k rows are permuted from interleaved to rotate-half pairs.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from vlmserve import kernels
from vlmserve.models.layers.activation import activation
from vlmserve.models.layers.attention import segment_cu_seqlens, vision_attention
from vlmserve.models.layers.norm import RMSNorm
from vlmserve.models.layers.rotary import rope_inv_freq
from vlmserve.models.pixtral.config import PixtralModelConfig, PixtralVisionModelConfig

Device = torch.device | str


def vision_rope_cos_sin(
    grids: Sequence[tuple[int, int]], head_dim: int, theta: float, device: Device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin float32 [sum(rows * cols), head_dim / 2] for images with patch grids
    (rows, cols), patches row-major within each image, images in order."""
    inv_freq = rope_inv_freq(head_dim, theta, device=device)  # [D/2]
    row_freq, col_freq = inv_freq[0::2], inv_freq[1::2]  # [D/4] each
    parts = []
    for rows, cols in grids:
        h = torch.arange(rows, device=device, dtype=torch.float32).repeat_interleave(cols)
        w = torch.arange(cols, device=device, dtype=torch.float32).repeat(rows)
        parts.append(torch.cat([h[:, None] * row_freq, w[:, None] * col_freq], dim=-1))
    angles = torch.cat(parts) if parts else torch.empty(0, head_dim // 2, device=device)
    return angles.cos(), angles.sin()


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """float [C, H, W] (H, W multiples of P) → [(H/P) * (W/P), C * P * P]: patches row-major
    over the grid, each flattened (channel, row, col) like a Conv2d kernel."""
    c, h, w = pixel_values.shape
    p = patch_size
    x = pixel_values.reshape(c, h // p, p, w // p, p).permute(1, 3, 0, 2, 4)
    return x.reshape((h // p) * (w // p), c * p * p)


class PixtralVisionAttention(nn.Module):
    def __init__(self, cfg: PixtralVisionModelConfig, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        e = cfg.hidden_size
        # Rows: q (E), then k (E), then v (E); the checkpoint's q/k/v are fused at load time.
        self.qkv_proj = nn.Linear(e, 3 * e, bias=False, dtype=dtype, device=device)
        self.o_proj = nn.Linear(e, e, bias=False, dtype=dtype, device=device)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
    ) -> torch.Tensor:
        n = x.shape[0]
        # Strided [N, H, D] views into the fused output: the kernels need only the last dim contiguous.
        q, k, v = self.qkv_proj(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        kernels.rotary(q, k, cos, sin)
        out = vision_attention(q, k, v, cu_seqlens, max_seqlen, self.head_dim**-0.5)
        return self.o_proj(out.reshape(n, -1))


class PixtralVisionMLP(nn.Module):
    def __init__(self, cfg: PixtralVisionModelConfig, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        self.act_name = cfg.hidden_act
        self.act = activation(cfg.hidden_act)
        # Rows: gate (I), then up (I) — the order kernels.silu_and_mul expects.
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.act_name == "silu":  # Pixtral-12B
            return self.down_proj(kernels.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)  # e.g. "gelu": transformers' class default (exact erf GELU)
        return self.down_proj(self.act(gate) * up)


class PixtralVisionLayer(nn.Module):
    def __init__(self, cfg: PixtralVisionModelConfig, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.attention = PixtralVisionAttention(cfg, dtype, device)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.feed_forward = PixtralVisionMLP(cfg, dtype, device)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
    ) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, cu_seqlens, max_seqlen)
        return x + self.feed_forward(self.ffn_norm(x))


class PixtralVisionModel(nn.Module):
    """Returns the hidden states at `feature_indices` (0: after ln_pre, i: after layer i),
    concatenated in that order; layers past the last one read are not run."""

    def __init__(
        self, cfg: PixtralVisionModelConfig, feature_indices: Sequence[int], dtype: torch.dtype, device: Device
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.feature_indices = tuple(feature_indices)
        # Conv2d with kernel == stride is a matmul with the flattened kernel [E, C*P*P].
        self.patch_conv = nn.Linear(cfg.patch_input_dim, cfg.hidden_size, bias=False, dtype=dtype, device=device)
        self.ln_pre = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.layers = nn.ModuleList(PixtralVisionLayer(cfg, dtype, device) for _ in range(cfg.num_hidden_layers))

    def forward(self, pixel_values: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]]) -> torch.Tensor:
        """pixel_values: per image float [C, rows * P, cols * P]; grids: (rows, cols) per image
        → features [sum(rows * cols), E * len(feature_indices)], images in order."""
        w = self.patch_conv.weight
        patches = torch.cat([patchify(pv.to(device=w.device, dtype=w.dtype), self.cfg.patch_size) for pv in pixel_values])
        return self.forward_patches(patches, grids)

    def forward_patches(self, patches: torch.Tensor, grids: Sequence[tuple[int, int]]) -> torch.Tensor:
        """patches [sum(rows * cols), C * P * P] in the tower's dtype and device, each image's
        patches row-major (`patchify`'s layout, `kernels.normalize_patchify`'s "patches")."""
        w = self.patch_conv.weight
        x = self.ln_pre(self.patch_conv(patches))  # [N, E]
        cos, sin = vision_rope_cos_sin(grids, self.cfg.head_dim, self.cfg.rope_theta, w.device)  # [N, D/2]
        cu_seqlens, max_seqlen = segment_cu_seqlens([r * c for r, c in grids], w.device)
        kept = {0: x} if 0 in self.feature_indices else {}  # hidden-state index -> [N, E]
        for i, layer in enumerate(self.layers[: max(self.feature_indices)], start=1):
            x = layer(x, cos, sin, cu_seqlens, max_seqlen)
            if i in self.feature_indices:
                kept[i] = x
        return torch.cat([kept[i] for i in self.feature_indices], dim=-1)


class LlavaMultiModalProjector(nn.Module):
    """Vision features [N, E * number of feature layers] → language-model rows [N, hidden]:
    linear, `projector_hidden_act` (GELU for Pixtral), linear."""

    def __init__(self, cfg: PixtralModelConfig, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        bias = cfg.projector_bias
        self.act = activation(cfg.projector_hidden_act)
        width = cfg.vision.hidden_size * len(cfg.vision_feature_layers)
        self.linear_1 = nn.Linear(width, cfg.hidden_size, bias=bias, dtype=dtype, device=device)
        self.linear_2 = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))
