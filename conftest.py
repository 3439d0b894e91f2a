"""Root pytest configuration.

Triton reads TRITON_INTERPRET when it is first imported, so the variable is set here,
before any test module (or torch._inductor) can import triton. On a machine without
CUDA the kernels then run in the interpreter on CPU tensors.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 could be set")
    os.environ["TRITON_INTERPRET"] = "1"
