"""cos/sin tables for rotary position embeddings, in the layout `kernels.rotary` takes:
cos, sin [T, D // 2] float32, rotate-half pairing (slot i rotates x[i] with x[i + D/2]).

Three flavours:
- 1-D RoPE: slot i has angle pos * inv_freq[i];
- M-RoPE (Qwen2-VL text): positions [3, T] for the (t, h, w) axes; the D/2 frequency slots are
  cut into `mrope_section` runs and run j takes its angle from axis j % 3;
- 2-D vision rotary (Qwen2-VL ViT): per patch (h, w); inv_freq has D/4 entries, and the D/2
  slots are [h * inv_freq, w * inv_freq].
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch


def rope_inv_freq(rotary_dim: int, theta: float, device: torch.device | str | None = None) -> torch.Tensor:
    """[rotary_dim // 2] float32: theta ** (-2i / rotary_dim)."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim
    return 1.0 / (theta**exponents)


def _cos_sin(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return angles.cos(), angles.sin()


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions int [T] → cos, sin [T, len(inv_freq)]."""
    return _cos_sin(positions.to(torch.float32).unsqueeze(-1) * inv_freq)


def mrope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, mrope_section: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions int [3, T] (or [T]: text-only, the same on all axes) → cos, sin [T, D/2].

    Requires sum(mrope_section) == len(inv_freq) == D/2."""
    if sum(mrope_section) != inv_freq.numel():
        raise ValueError(f"mrope_section {list(mrope_section)} must sum to {inv_freq.numel()} (head_dim // 2)")
    if positions.dim() == 1:
        return rope_cos_sin(positions, inv_freq)
    if positions.dim() != 2 or positions.shape[0] != 3:
        raise ValueError(f"M-RoPE positions must be [3, T] or [T], got shape {tuple(positions.shape)}")
    # Slot run j takes its angle from axis j % 3: [T, D/2] positions, one gather.
    axis = _mrope_axis_of_slot(tuple(mrope_section), positions.device)
    return _cos_sin(positions.t().index_select(1, axis).to(torch.float32) * inv_freq)


@functools.lru_cache(maxsize=8)
def _mrope_axis_of_slot(mrope_section: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """int64 [D/2]: the position axis (0 t, 1 h, 2 w) each frequency slot reads."""
    return torch.cat([torch.full((n,), j % 3, dtype=torch.long, device=device) for j, n in enumerate(mrope_section)])


def vision_rotary_cos_sin(hw_positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hw_positions int [N, 2] (row h, column w of each patch); inv_freq [D/4] →
    cos, sin [N, D/2] with slots [h * inv_freq, w * inv_freq]."""
    angles = hw_positions.to(torch.float32).unsqueeze(-1) * inv_freq  # [N, 2, D/4]
    return _cos_sin(angles.flatten(1))


def vision_patch_positions(grid_thw: Sequence[tuple[int, int, int]], merge_size: int) -> torch.Tensor:
    """(h, w) of every patch, int64 [sum(t*h*w), 2], in the order Qwen2-VL's processor emits
    patches: frame by frame; within a frame, merge window by merge window (row-major over
    windows), and row-major inside each merge_size x merge_size window."""
    parts = []
    for t, h, w in grid_thw:
        if h % merge_size or w % merge_size:
            raise ValueError(f"grid h={h}, w={w} must be multiples of spatial_merge_size {merge_size}")
        hh = torch.arange(h).view(h // merge_size, merge_size, 1, 1).expand(-1, -1, w // merge_size, merge_size)
        ww = torch.arange(w).view(1, 1, w // merge_size, merge_size).expand(h // merge_size, merge_size, -1, -1)
        # [h/m, m, w/m, m] → [h/m, w/m, m, m]: windows outer, the window's rows/cols inner.
        hw = torch.stack([hh.permute(0, 2, 1, 3).flatten(), ww.permute(0, 2, 1, 3).flatten()], dim=-1)
        parts.append(hw.repeat(t, 1))
    return torch.cat(parts) if parts else torch.empty(0, 2, dtype=torch.long)
