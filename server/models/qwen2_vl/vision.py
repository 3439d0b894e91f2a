"""The Qwen2-VL vision tower: patch embedding, 2-D rotary ViT blocks, 2x2 patch merger.

Input is the image processor's `pixel_values` layout: [N, C * T * P * P] float rows, one per
(temporal_patch x patch x patch) cube, ordered frame by frame and, within a frame, merge
window by merge window (see `layers.rotary.vision_patch_positions`). Every item of a call
(images and videos) runs in one variable-length batch; attention stays within one frame
of one item, as in transformers (one `cu_seqlens` segment per frame).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlmserve import kernels
from vlmserve.models.layers.activation import activation
from vlmserve.models.layers.attention import segment_cu_seqlens, vision_attention
from vlmserve.models.layers.rotary import rope_inv_freq, vision_patch_positions, vision_rotary_cos_sin
from vlmserve.models.qwen2_vl.config import Qwen2VLVisionModelConfig


class VisionAttention(nn.Module):
    def __init__(self, cfg: Qwen2VLVisionModelConfig, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        # Rows of qkv: all q heads, then all k heads, then all v heads.
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=True, dtype=dtype, device=device)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=True, dtype=dtype, device=device)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
    ) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv(x).view(n, 3, self.num_heads, self.head_dim)
        # Strided [N, H, D] views, no copies: the kernels need only the last dim contiguous.
        q, k, v = qkv.unbind(1)
        kernels.rotary(q, k, cos, sin)
        out = vision_attention(q, k, v, cu_seqlens, max_seqlen, self.scale)
        return self.proj(out.reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: Qwen2VLVisionModelConfig, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.act = activation(cfg.hidden_act)  # quick_gelu in the published checkpoints
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_hidden_dim, dtype=dtype, device=device)
        self.fc2 = nn.Linear(cfg.mlp_hidden_dim, cfg.embed_dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: Qwen2VLVisionModelConfig, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        eps = cfg.layer_norm_eps
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=eps, dtype=dtype, device=device)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=eps, dtype=dtype, device=device)
        self.attn = VisionAttention(cfg, dtype, device)
        self.mlp = VisionMLP(cfg, dtype, device)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens, max_seqlen)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm per patch, then each merge window's m*m consecutive patches are
    concatenated ([N, E] → [N / m^2, E * m^2]) and projected by a GELU MLP to the LM width."""

    def __init__(self, cfg: Qwen2VLVisionModelConfig, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.merged_dim = cfg.embed_dim * cfg.spatial_merge_size**2
        self.ln_q = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps, dtype=dtype, device=device)
        self.fc1 = nn.Linear(self.merged_dim, self.merged_dim, dtype=dtype, device=device)
        self.fc2 = nn.Linear(self.merged_dim, cfg.out_hidden_size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_q(x).view(-1, self.merged_dim)
        return self.fc2(F.gelu(self.fc1(x)))


class Qwen2VisionTransformer(nn.Module):
    def __init__(self, cfg: Qwen2VLVisionModelConfig, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.cfg = cfg
        # Conv3d with kernel == stride over one cube is a matmul with the flattened kernel:
        # weight [E, C*T*P*P], the checkpoint's [E, C, T, P, P] flattened row-major.
        self.patch_embed = nn.Linear(cfg.patch_input_dim, cfg.embed_dim, bias=False, dtype=dtype, device=device)
        self.blocks = nn.ModuleList(VisionBlock(cfg, dtype, device) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, dtype, device)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.weight.dtype

    def forward(self, pixel_values: torch.Tensor, grid_thw: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """pixel_values [sum(t*h*w), C*T*P*P] for all items, concatenated in item order;
        grid_thw one (t, h, w) per item → [sum(t*h*w) / m^2, out_hidden] merged rows."""
        cfg = self.cfg
        expected = sum(t * h * w for t, h, w in grid_thw)
        if pixel_values.dim() != 2 or pixel_values.shape != (expected, cfg.patch_input_dim):
            raise ValueError(
                f"pixel_values must be [{expected}, {cfg.patch_input_dim}] for grids {list(grid_thw)}, "
                f"got {tuple(pixel_values.shape)}"
            )
        device = self.patch_embed.weight.device
        x = self.patch_embed(pixel_values.to(device=device, dtype=self.dtype))  # [N, E]

        hw = vision_patch_positions(grid_thw, cfg.spatial_merge_size).to(device)
        inv_freq = rope_inv_freq(cfg.head_dim // 2, cfg.rope_theta, device=device)  # [D/4]
        cos, sin = vision_rotary_cos_sin(hw, inv_freq)  # [N, D/2] float32
        frames = [h * w for t, h, w in grid_thw for _ in range(t)]
        cu_seqlens, max_seqlen = segment_cu_seqlens(frames, device)

        for block in self.blocks:
            x = block(x, cos, sin, cu_seqlens, max_seqlen)
        return self.merger(x)
