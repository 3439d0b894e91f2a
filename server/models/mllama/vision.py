"""The Mllama vision tower: tiles of one image → cross-attention rows for the decoder.

Input per image: `max_num_tiles` tiles of [C, S, S] normalised pixels (the image's real
tiles first, then zero tiles), its aspect-ratio id (1-based; 0 = no image) and its number of
real tiles. All images of a call run as one batch.

Per tile: a patch embedding (Conv2d with kernel == stride, done as a Linear over flattened
patches), a gated pre-tile aspect-ratio embedding, a class token in front (P = grid² + 1
tokens), gated position + tile-position embeddings, LayerNorm, then zero padding to Pp, a
multiple of 8. The local transformer and, after LayerNorm + a gated post-tile embedding, the
gated global transformer attend over all T * Pp tokens of one image.

Attention mask (transformers' `_prepare_aspect_ratio_attention_mask`, reproduced exactly):
a token is "padding" if it is in a padded tile or is one of a tile's Pp - P pad slots; the
mask blocks a (query, key) pair only when BOTH are padding. So real tokens attend to every
token of their image, padding tokens to the real ones only. With the image's tokens reordered
[real | padding], both are prefix ranges of the image's keys, which `kernels.cross_attention`
takes directly (one block of L = T * Pp rows per image): real → [0, L), padding → [0, R).

Output per image: [T * P, vision_output_dim] rows in (tile, patch) order: the final global
hidden state followed by the local layers' intermediate states, interleaved per channel as
transformers stacks them (feature h * K + k for intermediate k of K).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmserve import kernels
from vlmserve.models.layers.activation import activation
from vlmserve.models.mllama.config import MllamaVisionModelConfig

Device = torch.device | str


class VisionEncoderLayer(nn.Module):
    def __init__(self, cfg: MllamaVisionModelConfig, gated: bool, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.input_layernorm = nn.LayerNorm(h, eps=cfg.norm_eps, dtype=dtype, device=device)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=cfg.norm_eps, dtype=dtype, device=device)
        # Rows: q, k, v (each all heads); no biases in the checkpoint.
        self.qkv_proj = nn.Linear(h, 3 * h, bias=False, dtype=dtype, device=device)
        self.o_proj = nn.Linear(h, h, bias=False, dtype=dtype, device=device)
        self.act = activation(cfg.hidden_act)
        self.fc1 = nn.Linear(h, cfg.intermediate_size, dtype=dtype, device=device)
        self.fc2 = nn.Linear(cfg.intermediate_size, h, dtype=dtype, device=device)
        self.gated = gated
        if gated:
            self.gate_attn = nn.Parameter(torch.empty(1, dtype=dtype, device=device))
            self.gate_ffn = nn.Parameter(torch.empty(1, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, attn: "_ImageAttention") -> torch.Tensor:
        """x [N, H] (images' tokens in [real | padding] order, image after image)."""
        n = x.shape[0]
        qkv = self.qkv_proj(self.input_layernorm(x)).view(n, 3, self.num_heads, self.head_dim)
        out = self.o_proj(attn(qkv[:, 0], qkv[:, 1], qkv[:, 2]).reshape(n, -1))
        x = x + (self.gate_attn.tanh() * out if self.gated else out)
        out = self.fc2(self.act(self.fc1(self.post_attention_layernorm(x))))
        return x + (self.gate_ffn.tanh() * out if self.gated else out)


class _ImageAttention:
    """Attention within each image under the aspect-ratio mask (see the module docstring):
    images are blocks of L rows, each query with its prefix range of keys."""

    def __init__(self, num_real: list[int], tokens_per_image: int, scale: float, device: torch.device) -> None:
        n, length = len(num_real), tokens_per_image
        self.length, self.scale = length, scale
        self.block_tables = torch.arange(n, dtype=torch.int32, device=device).unsqueeze(1)
        self.seq_lens = torch.full((n,), length, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(0, (n + 1) * length, length, dtype=torch.int32, device=device)
        pos = torch.arange(length, device=device).unsqueeze(0)  # [1, L]
        real = torch.tensor(num_real, device=device).unsqueeze(1)  # [n, 1]
        end = torch.where(pos < real, length, real.expand(-1, length))  # [n, L]
        self.ranges = torch.stack([torch.zeros_like(end), end], dim=-1).view(-1, 2).to(torch.int32)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        heads, dim = k.shape[1], k.shape[2]
        k_blocks = k.reshape(-1, self.length, heads, dim)  # [images, L, H, D]: one block per image
        v_blocks = v.reshape(-1, self.length, heads, dim)
        return kernels.cross_attention(
            q, k_blocks, v_blocks, self.block_tables, self.seq_lens, self.ranges, self.query_start_loc, self.scale
        )


class MllamaVisionModel(nn.Module):
    def __init__(self, cfg: MllamaVisionModelConfig, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        self.cfg = cfg
        h, t, p = cfg.hidden_size, cfg.max_num_tiles, cfg.num_patches
        ids = cfg.num_aspect_ratios + 1
        self.patch_embedding = nn.Linear(
            cfg.num_channels * cfg.patch_size**2, h, bias=False, dtype=dtype, device=device
        )
        self.class_embedding = nn.Parameter(torch.empty(h, dtype=dtype, device=device))
        # Gated position embeddings: (1 - tanh g) * per-patch + tanh g * per-(aspect ratio, tile, patch).
        self.position_embedding = nn.Parameter(torch.empty(p, h, dtype=dtype, device=device))
        self.position_gate = nn.Parameter(torch.empty(1, dtype=dtype, device=device))
        self.tile_position_embedding = nn.Embedding(ids, t * p * h, dtype=dtype, device=device)
        # Aspect-ratio embeddings added to every token of a tile, before and after the local layers.
        self.pre_tile_embedding = nn.Embedding(ids, t * h, dtype=dtype, device=device)
        self.pre_tile_gate = nn.Parameter(torch.empty(1, dtype=dtype, device=device))
        self.post_tile_embedding = nn.Embedding(ids, t * h, dtype=dtype, device=device)
        self.post_tile_gate = nn.Parameter(torch.empty(1, dtype=dtype, device=device))
        # transformers builds these two with nn.LayerNorm's default eps, not norm_eps.
        self.layernorm_pre = nn.LayerNorm(h, dtype=dtype, device=device)
        self.layernorm_post = nn.LayerNorm(h, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            VisionEncoderLayer(cfg, False, dtype, device) for _ in range(cfg.num_hidden_layers)
        )
        self.global_layers = nn.ModuleList(
            VisionEncoderLayer(cfg, True, dtype, device) for _ in range(cfg.num_global_layers)
        )

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor, num_tiles: list[int]) -> torch.Tensor:
        """pixel_values [B, T, C, S, S] (tiles past num_tiles[i] are zeros), aspect_ratio_ids
        int64 [B] → [B, T, P, vision_output_dim]."""
        cfg = self.cfg
        b, t = pixel_values.shape[:2]
        g, ps, hid, p, pp = cfg.grid, cfg.patch_size, cfg.hidden_size, cfg.num_patches, cfg.padded_patches
        if tuple(pixel_values.shape[1:]) != (cfg.max_num_tiles, cfg.num_channels, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"pixel_values must be [B, {cfg.max_num_tiles}, {cfg.num_channels}, {cfg.image_size}, "
                f"{cfg.image_size}], got {tuple(pixel_values.shape)}"
            )
        x = pixel_values.to(self.patch_embedding.weight)
        # [B*T, C, g, ps, g, ps] → [B*T, g*g, C*ps*ps]: rows row-major over the patch grid,
        # columns in the Conv2d weight's (channel, row, col) order.
        x = x.reshape(b * t, cfg.num_channels, g, ps, g, ps).permute(0, 2, 4, 1, 3, 5).reshape(b * t, g * g, -1)
        x = self.patch_embedding(x).view(b, t, g * g, hid)
        x = x + self.pre_tile_gate.tanh() * self.pre_tile_embedding(aspect_ratio_ids).view(b, t, 1, hid)
        x = torch.cat([self.class_embedding.view(1, 1, 1, hid).expand(b, t, 1, hid), x], dim=2)  # [B, T, P, H]
        gate = self.position_gate.tanh()
        x = x + (1 - gate) * self.position_embedding
        x = x + gate * self.tile_position_embedding(aspect_ratio_ids).view(b, t, p, hid)
        x = F.pad(self.layernorm_pre(x), (0, 0, 0, pp - p))  # [B, T, Pp, H]

        # [real | padding] order per image, and the attention over it.
        length = t * pp
        tile = torch.arange(t, device=x.device).view(1, t, 1)
        patch = torch.arange(pp, device=x.device).view(1, 1, pp)
        real = (tile < torch.tensor(num_tiles, device=x.device).view(b, 1, 1)) & (patch < p)  # [B, T, Pp]
        order = torch.argsort((~real).view(b, length).to(torch.int8), dim=1, stable=True)  # [B, L]
        order = (order + torch.arange(b, device=x.device).unsqueeze(1) * length).view(-1)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=x.device)
        attn = _ImageAttention([n * p for n in num_tiles], length, cfg.head_dim**-0.5, x.device)

        h = x.reshape(b * length, hid)[order]
        # Layer i's output is intermediate state i (negative indices count from the last layer).
        wanted = [i % cfg.num_hidden_layers for i in cfg.intermediate_layers_indices]
        saved: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            h = layer(h, attn)
            if i in wanted:
                saved[i] = h
        h = self.layernorm_post(h[inverse]).view(b, t, pp, hid)
        h = h + self.post_tile_gate.tanh() * self.post_tile_embedding(aspect_ratio_ids).view(b, t, 1, hid)
        h = h.reshape(b * length, hid)[order]
        for layer in self.global_layers:
            h = layer(h, attn)

        # Intermediate states in the order of intermediate_layers_indices, as transformers stacks them.
        stacked = torch.stack([saved[i][inverse] for i in wanted], dim=-1)  # [B*L, H, K]
        out = torch.cat([h[inverse], stacked.flatten(1)], dim=-1)  # [B*L, H * (1 + K)]
        return out.view(b, t, pp, -1)[:, :, :p]
