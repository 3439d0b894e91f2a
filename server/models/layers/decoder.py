"""The pre-norm decoder shared by the Qwen2, Mistral and Llama language models: fused
q/k/v attention over the paged KV cache, a gated MLP with fused gate/up (SiLU unless the
config's `hidden_act` says otherwise), RMSNorm with the residual add fused into it.

Tensor parallelism (`tp`, see `layers/parallel.py`): q heads and KV heads split across ranks
(KV heads replicated when fewer than ranks), gate/up split by intermediate rows, o_proj and
down_proj row-parallel (all-reduced), the embedding split by vocabulary.

Module names (`self_attn.qkv_proj`, `mlp.gate_up_proj`, `input_layernorm`, ...) are what the
families' `load_weights` map checkpoint names onto. Tensors are [T, hidden] over the step's
flattened batch; cos/sin [T, head_dim // 2] come from the family's rotary.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmserve import kernels
from vlmserve.models.layers.activation import activation
from vlmserve.models.layers.attention import PagedAttention
from vlmserve.models.layers.norm import RMSNorm
from vlmserve.models.layers.parallel import (
    SINGLE, ColumnParallelLinear, RowParallelLinear, TPGroup, VocabParallelEmbedding, divide, even_split,
    kv_head_split, local_kv_heads,
)
from vlmserve.runner.forward_batch import ForwardBatch

Device = torch.device | str


class PagedSelfAttention(nn.Module):
    def __init__(
        self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int, qkv_bias: bool,
        dtype: torch.dtype, device: Device, tp: TPGroup = SINGLE,
    ) -> None:
        super().__init__()
        # Local head counts: this rank's q heads and the KV heads they read.
        self.num_heads = divide(num_heads, tp, "the number of attention heads")
        self.num_kv_heads, self.head_dim = local_kv_heads(num_kv_heads, tp), head_dim
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        # Rows: q (Hq * D), then k (Hkv * D), then v (Hkv * D) — this rank's heads of each.
        kv = kv_head_split(tp, num_kv_heads, head_dim)
        parts = [("q_proj", num_heads * head_dim, even_split(tp)), ("k_proj", num_kv_heads * head_dim, kv),
                 ("v_proj", num_kv_heads * head_dim, kv)]
        self.qkv_proj = ColumnParallelLinear(hidden, parts, qkv_bias, dtype, device)
        self.o_proj = RowParallelLinear(num_heads * head_dim, hidden, False, tp, dtype, device)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, head_dim, layer_idx, head_dim**-0.5)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # Strided [T, H, D] views into the fused output, no copies: the kernels need only the
        # last dim contiguous.
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        kernels.rotary(q, k, cos, sin)
        return self.o_proj(self.attn(q, k, v, batch).reshape(n, self.q_size))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)); `act` is a `layers.activation` name ("silu" runs the fused
    kernel)."""

    def __init__(
        self, hidden: int, intermediate: int, dtype: torch.dtype, device: Device, act: str = "silu",
        tp: TPGroup = SINGLE,
    ) -> None:
        super().__init__()
        self.act_name = act
        self.act = activation(act)
        divide(intermediate, tp, "the MLP intermediate size")
        # Rows: gate (I), then up (I) — the order kernels.silu_and_mul expects; this rank's
        # I / size rows of each.
        parts = [("gate_proj", intermediate, even_split(tp)), ("up_proj", intermediate, even_split(tp))]
        self.gate_up_proj = ColumnParallelLinear(hidden, parts, False, dtype, device)
        self.down_proj = RowParallelLinear(intermediate, hidden, False, tp, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.act_name in ("silu", "swish"):
            return self.down_proj(kernels.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(
        self, hidden: int, intermediate: int, num_heads: int, num_kv_heads: int, head_dim: int, eps: float,
        layer_idx: int, qkv_bias: bool, dtype: torch.dtype, device: Device, act: str = "silu",
        tp: TPGroup = SINGLE,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps, dtype, device)
        self.self_attn = PagedSelfAttention(
            hidden, num_heads, num_kv_heads, head_dim, layer_idx, qkv_bias, dtype, device, tp
        )
        self.post_attention_layernorm = RMSNorm(hidden, eps, dtype, device)
        self.mlp = GatedMLP(hidden, intermediate, dtype, device, act, tp)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's output before its residual add; residual: the running sum
        (None at the first layer, where x is the embeddings). Returns the same pair."""
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin, batch)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class TextDecoder(nn.Module):
    """Token embeddings, `num_layers` DecoderLayers, the final norm."""

    def __init__(
        self, vocab_size: int, hidden: int, intermediate: int, num_layers: int, num_heads: int, num_kv_heads: int,
        head_dim: int, eps: float, qkv_bias: bool, dtype: torch.dtype, device: Device, act: str = "silu",
        tp: TPGroup = SINGLE,
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(vocab_size, hidden, tp, dtype, device)
        self.layers = nn.ModuleList(
            DecoderLayer(hidden, intermediate, num_heads, num_kv_heads, head_dim, eps, i, qkv_bias, dtype, device, act, tp)
            for i in range(num_layers)
        )
        self.norm = RMSNorm(hidden, eps, dtype, device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, batch)
        if residual is None:  # no layers
            return self.norm(x)
        x, _ = self.norm(x, residual)
        return x
