"""NVLM-D's vision side: InternViT-6B (the remote code's `InternVisionModel`), pixel shuffle
and the `mlp1` projector (`NVLM_D_Model.extract_feature`).

InternViT over one 448-px tile: Conv2d patch embedding (patch 14, bias) → [class token,
32 x 32 patches] + a learned position table → pre-norm layers
    x = x + ls1 * proj(attention(qk-norm(qkv(rms1(x)))))
    x = x + ls2 * fc2(gelu(fc1(rms2(x))))
with RMSNorm everywhere (the NVLM copy of the code uses InternRMSNorm whatever norm_type
says), fused q/k/v without bias, and q/k normalised by an RMSNorm over all real heads
together (not per head). Every tile of a call runs in one flattened batch; attention stays
within each tile (one `cu_seqlens` segment per tile).

Dummy heads: the official attention pads its heads with 7 zero "dummy" heads (for tensor
parallelism) and computes the q/k-norm variance over the real channels only; with their
output-projection columns zero (what "the same output as InternViT" means), they change
nothing, so `NVLMDForCausalLM.load_weights` strips them and this tower has the real heads only.

Then per tile: drop the class token, [g, g, C] → pixel shuffle (ps_version v2) →
[(g/2)^2, 4C] → mlp1 = LayerNorm(4C) → Linear(4C → LM intermediate) → GELU → Linear(→ LM
hidden): 256 rows per tile, which replace the tile's 256 `<|vision_pad|>` embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmserve import kernels
from vlmserve.models.layers.activation import activation
from vlmserve.models.layers.attention import segment_cu_seqlens, vision_attention
from vlmserve.models.layers.norm import RMSNorm
from vlmserve.models.nvlm_d.config import InternVisionConfig, NVLMDModelConfig

Device = torch.device | str


class InternAttention(nn.Module):
    def __init__(self, cfg: InternVisionConfig, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        # Rows: q (C), k (C), v (C) — the real heads of the checkpoint's (3, H + dummy, hd) rows.
        self.qkv = nn.Linear(c, 3 * c, bias=cfg.qkv_bias, dtype=dtype, device=device)
        self.qk_normalization = cfg.qk_normalization
        if cfg.qk_normalization:
            self.q_norm = RMSNorm(c, cfg.layer_norm_eps, dtype, device)
            self.k_norm = RMSNorm(c, cfg.layer_norm_eps, dtype, device)
        self.proj = nn.Linear(c, c, bias=True, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        n, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # [N, C] each
        if self.qk_normalization:
            q, k = self.q_norm(q.contiguous()), self.k_norm(k.contiguous())
        shape = (n, self.num_heads, self.head_dim)
        out = vision_attention(
            q.reshape(shape), k.reshape(shape), v.contiguous().view(shape), cu_seqlens, max_seqlen, self.head_dim**-0.5
        )
        return self.proj(out.reshape(n, c))


class InternMLP(nn.Module):
    def __init__(self, cfg: InternVisionConfig, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        self.act = activation(cfg.hidden_act)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, device=device)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, cfg: InternVisionConfig, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.norm1 = RMSNorm(c, cfg.layer_norm_eps, dtype, device)
        self.attn = InternAttention(cfg, dtype, device)
        self.norm2 = RMSNorm(c, cfg.layer_norm_eps, dtype, device)
        self.mlp = InternMLP(cfg, dtype, device)
        self.ls1 = nn.Parameter(torch.empty(c, dtype=dtype, device=device))
        self.ls2 = nn.Parameter(torch.empty(c, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cu_seqlens, max_seqlen) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class InternVisionEmbeddings(nn.Module):
    def __init__(self, cfg: InternVisionConfig, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        c, p = cfg.hidden_size, cfg.patch_size
        self.class_embedding = nn.Parameter(torch.empty(1, 1, c, dtype=dtype, device=device))
        # The Conv2d [C, 3, P, P] as a Linear over (channel, row, col)-flattened patches.
        self.patch_embedding = nn.Linear(3 * p * p, c, bias=True, dtype=dtype, device=device)
        self.position_embedding = nn.Parameter(torch.empty(1, cfg.grid**2 + 1, c, dtype=dtype, device=device))

    def forward(self, patches: torch.Tensor, num_tiles: int) -> torch.Tensor:
        """patches [T * g^2, 3 * P * P] (each tile's patches row-major) → [T, g^2 + 1, C]."""
        x = self.patch_embedding(patches).view(num_tiles, -1, self.class_embedding.shape[-1])
        cls = self.class_embedding.expand(num_tiles, 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding


class InternVisionModel(nn.Module):
    def __init__(self, cfg: InternVisionConfig, num_layers: int, dtype: torch.dtype, device: Device) -> None:
        """`num_layers`: the layers whose output is used (config.select_layer); the checkpoint's
        later layers are skipped at load."""
        super().__init__()
        self.embeddings = InternVisionEmbeddings(cfg, dtype, device)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(InternVisionEncoderLayer(cfg, dtype, device) for _ in range(num_layers))

    def forward(self, patches: torch.Tensor, num_tiles: int) -> torch.Tensor:
        """patches [T * g^2, 3 * P * P] → hidden [T, g^2 + 1, C] (class token first)."""
        x = self.embeddings(patches, num_tiles)
        seq = x.shape[1]
        cu_seqlens, max_seqlen = segment_cu_seqlens([seq] * num_tiles, x.device)
        h = x.reshape(num_tiles * seq, -1)
        for layer in self.encoder.layers:
            h = layer(h, cu_seqlens, max_seqlen)
        return h.view(num_tiles, seq, -1)


def pixel_shuffle(x: torch.Tensor, scale_factor: float, ps_version: str) -> torch.Tensor:
    """[n, w, h, c] → [n, w * s, h * s, c / s^2]: the official `pixel_shuffle`, view for view
    (v1 leaves the result transposed, as the official code warns; NVLM-D uses v2)."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    if ps_version != "v1":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


class VisionProjector(nn.Module):
    """`mlp1`: LayerNorm(4C) → Linear(4C → LM intermediate, no bias) → GELU → Linear(→ LM hidden,
    no bias). Module names 0, 1, 3 are the checkpoint's (2 is the GELU)."""

    def __init__(self, config: NVLMDModelConfig, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        width = config.vision.hidden_size * config.shuffle_factor**2
        self.norm = nn.LayerNorm(width, eps=1e-5, dtype=dtype, device=device)
        self.fc1 = nn.Linear(width, config.intermediate_size, bias=False, dtype=dtype, device=device)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class NVLMDVision(nn.Module):
    """Tiles → LM-width rows: InternViT, class token dropped, pixel shuffle, mlp1."""

    def __init__(self, config: NVLMDModelConfig, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        self.config = config
        self.vision_model = InternVisionModel(config.vision, config.vision_layers_used, dtype, device)
        self.mlp1 = VisionProjector(config, dtype, device)

    @property
    def dtype(self) -> torch.dtype:
        return self.mlp1.fc1.weight.dtype

    def forward(self, patches: torch.Tensor, num_tiles: int) -> torch.Tensor:
        """patches [T * g^2, 3 * P * P] → [T * tokens_per_tile, LM hidden], tile by tile."""
        g = self.config.vision.grid
        h = self.vision_model(patches, num_tiles)[:, 1:, :]
        h = h.reshape(num_tiles, g, g, -1)
        h = pixel_shuffle(h, self.config.downsample_ratio, self.config.ps_version)
        return self.mlp1(h.reshape(num_tiles * self.config.tokens_per_tile, -1))


def normalize_tiles(pixels: torch.Tensor, lut: torch.Tensor, patch_size: int, dtype: torch.dtype) -> torch.Tensor:
    """uint8 tiles [T, S, S, 3] on the device → normalised patch rows [T * (S/P)^2, 3 * P * P]
    of `dtype`: each tile a frame of the "patches" layout (row-major patches, (C, P, P))."""
    return kernels.normalize_patchify(pixels, lut, patch_size, 1, 1, "patches", dtype)
