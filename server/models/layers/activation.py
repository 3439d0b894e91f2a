"""The activations a checkpoint's config may name (`hidden_act`, `projector_hidden_act`), by
transformers' `ACT2FN` names, each computed exactly as transformers computes it.

Families check names when their config is parsed (`check_activation`), so an unsupported one
fails at load time, naming the key, rather than serving with another activation.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    # transformers' NewGELUActivation (the tanh approximation, spelled out as GPT-2 does).
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,  # exact (erf)
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": _gelu_new,
    "gelu_fast": _gelu_fast,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
}


def check_activation(name: str, key: str) -> str:
    """`name` if supported; otherwise a ValueError naming the config key and the choices."""
    if name not in ACTIVATIONS:
        raise ValueError(f"config.json {key} {name!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
    return name


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return ACTIVATIONS[check_activation(name, "activation")]
