"""Molmo v1's vision backbone: CLIP ViT (`image_vit`), 2x2 attention pooling
(`image_pooling_2d`), the SwiGLU projector (`image_projector`) and the padding embeddings.

Crops come in as the official `images` rows: [n_crops, 576, P * P * 3] normalised floats, each
patch flattened (patch row, patch col, channel) — the order of `patch_embedding`'s input.
  1. ViT: patch_embedding (no bias), CLS prepended, + positional_embedding (bicubic-resized if
     the crop's patch grid differs from its grid), pre_ln (LayerNorm in float32), then
     pre-norm blocks (LayerNorm, MHA with biases, LayerNorm, MLP; quick-GELU in ViT-L). All crops run as
     one variable-length batch, one `cu_seqlens` segment per crop (577 tokens).
  2. The hidden states after blocks -2 and -9 are concatenated ([.., 2E]); CLS dropped.
  3. pad_and_partial_pad: + pad_embed[0] where the crop's mask is 0 (all padding), +
     pad_embed[1] where it is in (-inf, 1) otherwise (partial padding, and the official
     -1 row); the mask of crop c is `image_masks[c]` (the official misalignment kept).
  4. Patch grid padded to even sides, cut into 2x2 windows; per window, attention of the mean
     of its 4 features (query) over the 4 (keys/values), float32 softmax, `wo`.
  5. Projector: w2(silu(w1(x)) * w3(x)) → [n_crops * 144, d_model].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlmserve.models.layers.activation import activation
from vlmserve.models.layers.attention import segment_cu_seqlens, vision_attention
from vlmserve.models.molmo.config import POOLING, VIT_ACTIVATIONS, MolmoModelConfig, MolmoVisionConfig

Device = torch.device | str


class ViTAttention(nn.Module):
    """Multi-head attention with biases; `in_dim` may differ from the output width (pooling
    reads the concatenated layers)."""

    def __init__(self, v: MolmoVisionConfig, in_dim: int, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = v.image_num_heads, v.image_num_key_value_heads, v.image_head_dim
        self.wq = nn.Linear(in_dim, self.num_heads * self.head_dim, dtype=dtype, device=device)
        self.wk = nn.Linear(in_dim, self.num_kv_heads * self.head_dim, dtype=dtype, device=device)
        self.wv = nn.Linear(in_dim, self.num_kv_heads * self.head_dim, dtype=dtype, device=device)
        self.wo = nn.Linear(self.num_heads * self.head_dim, v.image_emb_dim, dtype=dtype, device=device)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        x = x.view(*x.shape[:-1], n, self.head_dim)
        if n != self.num_heads:
            x = x.repeat_interleave(self.num_heads // n, dim=-2)
        return x

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """x [N, in_dim] over all crops → [N, E]; attention within each cu_seqlens segment."""
        q = self._heads(self.wq(x), self.num_heads)
        k = self._heads(self.wk(x), self.num_kv_heads)
        v = self._heads(self.wv(x), self.num_kv_heads)
        out = vision_attention(q, k, v, cu_seqlens, max_seqlen, self.head_dim**-0.5)
        return self.wo(out.reshape(x.shape[0], -1).to(x.dtype))

    def pool(self, query: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """query [W, 1, in_dim], kv [W, 4, in_dim] (one 2x2 window each) → [W, E]; float32
        scores and softmax, as the official sdpa path with float32_attention."""
        q = self._heads(self.wq(query), self.num_heads).float().transpose(1, 2)  # [W, H, 1, D]
        k = self._heads(self.wk(kv), self.num_kv_heads).float().transpose(1, 2)  # [W, H, 4, D]
        v = self._heads(self.wv(kv), self.num_kv_heads).float().transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [W, H, 1, D]
        return self.wo(out.transpose(1, 2).reshape(query.shape[0], -1).to(query.dtype))


class ViTBlock(nn.Module):
    def __init__(self, v: MolmoVisionConfig, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        e = v.image_emb_dim
        self.attention_norm = nn.LayerNorm(e, eps=v.image_norm_eps, dtype=dtype, device=device)
        self.attention = ViTAttention(v, e, dtype, device)
        self.ffn_norm = nn.LayerNorm(e, eps=v.image_norm_eps, dtype=dtype, device=device)
        self.feed_forward = nn.Module()
        self.feed_forward.w1 = nn.Linear(e, v.image_mlp_dim, dtype=dtype, device=device)
        self.feed_forward.w2 = nn.Linear(v.image_mlp_dim, e, dtype=dtype, device=device)
        self.act = activation(VIT_ACTIVATIONS[v.image_mlp_activations])

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cu_seqlens, max_seqlen)
        ff = self.feed_forward
        return x + ff.w2(self.act(ff.w1(self.ffn_norm(x))))


class VisionTransformer(nn.Module):
    def __init__(self, v: MolmoVisionConfig, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        self.v = v
        e = v.image_emb_dim
        self.class_embedding = nn.Parameter(torch.empty(e, dtype=dtype, device=device))
        self.positional_embedding = nn.Parameter(torch.empty(v.image_num_pos, e, dtype=dtype, device=device))
        self.patch_embedding = nn.Linear(v.image_patch_size**2 * 3, e, bias=False, dtype=dtype, device=device)
        self.pre_ln = nn.LayerNorm(e, eps=v.image_norm_eps, dtype=dtype, device=device)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(ViTBlock(v, dtype, device) for _ in range(v.image_num_layers))

    def _pos_emb(self) -> torch.Tensor:
        """[1 + h * w, E]: CLS position, then the patch grid's, resized to the crop's grid."""
        cls, grid = self.positional_embedding[:1], self.positional_embedding[1:]
        side = int(math.sqrt(grid.shape[0]))
        h, w = self.v.num_patch
        grid = grid.reshape(side, side, -1)
        if (side, side) != (h, w):
            grid = F.interpolate(grid.permute(2, 0, 1)[None], size=(h, w), mode="bicubic", align_corners=False,
                                 antialias=True)[0].permute(1, 2, 0)
        return torch.cat([cls, grid.reshape(h * w, -1)])

    def forward(self, crops: torch.Tensor) -> list[torch.Tensor]:
        """crops [n, N, P*P*3] → the hidden states after the blocks the features need,
        {block index: [n, 1 + N, E]} (later blocks are not run)."""
        n, num_patches, _ = crops.shape
        x = self.patch_embedding(crops)
        x = torch.cat([self.class_embedding.view(1, 1, -1).expand(n, 1, -1).to(x.dtype), x], dim=1)
        x = x + self._pos_emb()[None].to(x.dtype)
        x = F.layer_norm(x.float(), self.pre_ln.normalized_shape, self.pre_ln.weight.float(), self.pre_ln.bias.float(),
                         self.pre_ln.eps).to(x.dtype)
        seq = num_patches + 1
        cu_seqlens, max_seqlen = segment_cu_seqlens([seq] * n, x.device)
        x = x.reshape(n * seq, -1)
        wanted = set(self.v.feature_indices)
        kept: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.transformer.resblocks[: max(wanted) + 1]):
            x = block(x, cu_seqlens, max_seqlen)
            if i in wanted:
                kept[i] = x.view(n, seq, -1)
        return [kept[i] for i in self.v.feature_indices]


class Projector(nn.Module):
    def __init__(self, in_dim: int, hidden: int, d_model: int, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        self.w1 = nn.Linear(in_dim, hidden, bias=False, dtype=dtype, device=device)
        self.w2 = nn.Linear(hidden, d_model, bias=False, dtype=dtype, device=device)
        self.w3 = nn.Linear(in_dim, hidden, bias=False, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MolmoVisionBackbone(nn.Module):
    def __init__(self, cfg: MolmoModelConfig, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        v = cfg.vision
        self.v = v
        feat = v.image_emb_dim * len(v.feature_indices)
        self.image_vit = VisionTransformer(v, dtype, device)
        self.image_pooling_2d = ViTAttention(v, feat, dtype, device)
        self.image_projector = Projector(v.image_emb_dim, cfg.mlp_hidden, cfg.hidden_size, dtype, device)
        self.pad_embed = nn.Parameter(torch.empty(2, feat, dtype=dtype, device=device))

    def forward(self, crops: torch.Tensor, image_masks: torch.Tensor) -> torch.Tensor:
        """crops [n, N, P*P*3], image_masks [n, N] → [n, pooled_h * pooled_w, d_model]."""
        n = crops.shape[0]
        features = torch.cat(self.image_vit(crops), dim=-1)[:, 1:]  # [n, N, 2E], CLS dropped
        all_pad = (image_masks == 0).to(features.dtype)
        partial = ((image_masks < 1) & (image_masks != 0)).to(features.dtype)
        features = features + self.pad_embed[0] * all_pad[..., None]
        features = features + self.pad_embed[1] * partial[..., None]
        h, w = self.v.num_patch
        ph, pw = POOLING
        features = features.reshape(n, h, w, -1)
        if h % ph or w % pw:  # pad to whole windows (the official code pads one row and column)
            features = F.pad(features, (0, 0, 0, (-w) % pw, 0, (-h) % ph))
        gh, gw = features.shape[1] // ph, features.shape[2] // pw
        windows = features.reshape(n, gh, ph, gw, pw, -1).permute(0, 1, 3, 2, 4, 5).reshape(n * gh * gw, ph * pw, -1)
        pooled = self.image_pooling_2d.pool(windows.mean(-2, keepdim=True), windows)  # [n * gh * gw, E]
        return self.image_projector(pooled).view(n, gh * gw, -1)
