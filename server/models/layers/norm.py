"""RMSNorm through `kernels.rms_norm`, with the residual add fused in."""

from __future__ import annotations

import torch
from torch import nn

from vlmserve import kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] → normed [T, H]; with `residual`, x + residual is normed and returned
        too, as (normed, x + residual), so the caller carries the sum to the next layer."""
        return kernels.rms_norm(x, self.weight, self.eps, residual)
