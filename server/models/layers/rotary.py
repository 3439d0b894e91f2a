"""cos/sin tables for rotary position embeddings, in the layout `kernels.rotary` takes:
cos, sin [T, D // 2] float32, rotate-half pairing (slot i rotates x[i] with x[i + D/2]).

Three flavours (each over inverse frequencies optionally scaled, see `RopeScaling`):
- 1-D RoPE: slot i has angle pos * inv_freq[i];
- M-RoPE (Qwen2-VL text): positions [3, T] for the (t, h, w) axes; the D/2 frequency slots are
  cut into `mrope_section` runs and run j takes its angle from axis j % 3;
- 2-D vision rotary (Qwen2-VL ViT): per patch (h, w); inv_freq has D/4 entries, and the D/2
  slots are [h * inv_freq, w * inv_freq].
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch


def rope_inv_freq(rotary_dim: int, theta: float, device: torch.device | str | None = None) -> torch.Tensor:
    """[rotary_dim // 2] float32: theta ** (-2i / rotary_dim)."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim
    return 1.0 / (theta**exponents)


@dataclass(frozen=True)
class RopeScaling:
    """A checkpoint's RoPE frequency scaling: transformers' `rope_type` "linear" (every
    frequency divided by `factor`) or "llama3" (low frequencies divided, high ones kept, a
    smooth blend in between; the other fields are llama3's)."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_rope_parameters(cls, rope: dict[str, Any], key: str) -> RopeScaling | None:
        """`rope_parameters` / `rope_scaling` (merged) → None for plain RoPE; raises naming `key`
        for a type transformers would scale some other way."""
        rope_type = rope.get("rope_type", rope.get("type")) or "default"
        if rope_type in ("default", "mrope"):  # "mrope": Qwen2-VL's legacy name for plain M-RoPE
            return None
        if rope_type == "linear":
            return cls("linear", float(rope["factor"]))
        if rope_type == "llama3":
            return cls(
                "llama3",
                float(rope["factor"]),
                float(rope["low_freq_factor"]),
                float(rope["high_freq_factor"]),
                int(rope["original_max_position_embeddings"]),
            )
        raise ValueError(
            f"config.json {key} rope_type {rope_type!r} is not supported; expected 'default', 'linear' or 'llama3'"
        )


def scaled_rope_inv_freq(
    rotary_dim: int, theta: float, scaling: RopeScaling | None, device: torch.device | str | None = None
) -> torch.Tensor:
    """`rope_inv_freq` with the checkpoint's scaling applied, as transformers computes it."""
    inv_freq = rope_inv_freq(rotary_dim, theta, device)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


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
