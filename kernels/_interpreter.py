"""Support for running the Triton kernels on CPU tensors in Triton's interpreter
(TRITON_INTERPRET=1, read once when triton is first imported).

Imported by every kernel module before it defines its kernels. It
- records whether the interpreter is active (`INTERPRET`), so launchers can pick
  interpreter-friendly launch shapes (fewer, bigger programs) and check devices;
- patches two bfloat16 defects of the interpreter, which stores bf16 as raw uint16 bits:
  its `create_dot` multiplies those bits (triton#11584, "not supported yet"), so bf16
  operands are widened to float32 first; and its float32 → bf16 cast truncates, where the
  GPU rounds to nearest even, so that cast is done by torch (round to nearest even).
  Only applied under the interpreter: compiled kernels are untouched.
"""

from __future__ import annotations

import os

import numpy as np
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_patched = False


def _patch_bf16() -> None:
    global _patched
    if _patched:
        return
    from triton.runtime import interpreter as interp
    import triton.language as tl

    original = interp.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def widen(h):
            if h.dtype.scalar == tl.bfloat16:
                data = interp._convert_float(h.data, tl.bfloat16, tl.float32, None).view("float32")
                return interp.TensorHandle(data.reshape(h.data.shape), tl.float32)
            return h

        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    original_cast = interp.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interp.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return original_cast(self, src, dst_type)

    interp.InterpreterBuilder.create_dot = create_dot
    interp.InterpreterBuilder.cast_impl = cast_impl
    _patched = True


if INTERPRET:
    _patch_bf16()


def check_device(op: str, *tensors: torch.Tensor) -> None:
    """All tensors on one device; CPU tensors only under the interpreter."""
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"{op}: all tensors must be on one device, got {device} and {t.device}")
    if device.type == "cpu" and not INTERPRET:
        raise RuntimeError(
            f"{op}: the Triton kernel got CPU tensors but Triton's interpreter is off; set "
            "TRITON_INTERPRET=1 before triton is first imported, or use --kernel-backend torch"
        )


def check_last_dim_contiguous(op: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{op}: {name} must be contiguous in its last dim, got strides {tuple(t.stride())}")


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float(op: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
