"""PyTorch reference of every kernel op. The Triton kernels are tested against these,
and `dispatch` uses them on CPU tensors (or with `--kernel-backend torch`).

Shape conventions (T tokens of a flattened batch, H heads, D head dim):
- q: [T, Hq, D]; k, v: [T, Hkv, D]; Hq % Hkv == 0 (GQA).
- k_cache, v_cache: [num_blocks, block_size, Hkv, D].
- cos, sin: [T, D // 2], for the rotate-half layout (first half pairs with second half).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y = x / rms(x) * weight, computed in float32. With `residual`: x = x + residual
    first, and (y, x) is returned so the next layer gets the summed residual."""
    if residual is not None:
        x = x + residual
        residual = x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if residual is None else (out, residual)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2 * I] → [..., I]: silu(gate) * up, gate being the first half."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate q [T, Hq, D] and k [T, Hk, D] in place; cos/sin [T, D // 2] (float32 or the
    dtype of q). Rotate-half layout: x1 = x[..., :D/2] pairs with x2 = x[..., D/2:]."""
    c = cos.float().unsqueeze(1)
    s = sin.float().unsqueeze(1)
    d = q.shape[-1] // 2
    for x in (q, k):
        xf = x.float()
        x1, x2 = xf[..., :d], xf[..., d:]
        x.copy_(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1))  # copy_ casts back to x's dtype


def causal_mask(lq: int, lk: int, offset: int, device: torch.device | str) -> torch.Tensor:
    """bool [lq, lk], True where key j is hidden from query i: j > i + offset."""
    i = torch.arange(lq, device=device).unsqueeze(1)
    j = torch.arange(lk, device=device).unsqueeze(0)
    return j > i + offset


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """q [Lq, Hq, D], k/v [Lk, Hk, D] → [Lq, Hq, D]; mask bool [Lq, Lk] (True: not attended)
    or None. GQA without repeating K/V: the g = Hq / Hk query heads of a kv head are stacked
    as the rows of one product against that head's keys."""
    lq, hq, d = q.shape
    lk, hk = k.shape[0], k.shape[1]
    g = hq // hk
    qt = q.float().reshape(lq, hk, g, d).permute(1, 2, 0, 3).reshape(hk, g * lq, d)
    kt, vt = k.transpose(0, 1).float(), v.transpose(0, 1).float()  # [Hk, Lk, D]
    scores = torch.matmul(qt, kt.transpose(1, 2)).mul_(scale)  # [Hk, g * Lq, Lk]
    if mask is not None:
        scores.view(hk, g, lq, lk).masked_fill_(mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, vt).view(hq, lq, d).transpose(0, 1).to(q.dtype)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool,
    scale: float,
) -> torch.Tensor:
    """Attention within each sequence of a concatenation: sequence i is rows
    [cu_seqlens[i], cu_seqlens[i+1]) of q, k and v. Returns [T, Hq, D]."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e > s:
            mask = causal_mask(e - s, e - s, 0, q.device) if causal else None
            out[s:e] = _attend(q[s:e], k[s:e], v[s:e], scale, mask)
    return out


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter k/v [T, Hk, D] into the caches at flat slots block_id * block_size + offset."""
    nb, bs, hk, d = k_cache.shape
    k_cache.view(nb * bs, hk, d)[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(nb * bs, hk, d)[slot_mapping] = v.to(v_cache.dtype)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first seq_len cached rows of one request: [seq_len, Hk, D]."""
    bs = cache.shape[1]
    nblocks = (seq_len + bs - 1) // bs
    return cache.index_select(0, block_table[:nblocks]).flatten(0, 1)[:seq_len]


@dataclass
class PagedAttentionPlan:
    """What `paged_attention` derives from the batch alone (gather indices, masks), so that a
    step builds it once (`plan_paged_attention`) and every layer reuses it.

    Decodes (one query each) are batched: request b's whole blocks are gathered into row b of
    [B, nblocks * block_size] keys and the padding past its context is masked out. Prefill
    chunks (more than one query) go one by one."""

    # int64 [B]: the q rows of the decodes; None when the decodes are all of q's rows, in order.
    decode_rows: torch.Tensor | None
    decode_blocks: torch.Tensor | None  # int [B * nblocks]: each decode's blocks, request-major
    decode_pad: torch.Tensor | None  # bool [B, 1, 1, nblocks * block_size]: True past the context
    # (start, end, blocks int [nblocks], seq_len, mask bool [end - start, seq_len] True above the
    # causal diagonal) per prefill chunk.
    prefills: list[tuple[int, int, torch.Tensor, int, torch.Tensor]]


def plan_paged_attention(
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    block_size: int,
    query_start_loc_cpu: list[int] | None = None,
    seq_lens_cpu: list[int] | None = None,
) -> PagedAttentionPlan:
    """The host copies of query_start_loc / seq_lens, when given, spare a device sync."""
    starts = query_start_loc_cpu if query_start_loc_cpu is not None else query_start_loc.tolist()
    lens = seq_lens_cpu if seq_lens_cpu is not None else seq_lens.tolist()
    device = block_tables.device
    decodes = [i for i in range(len(lens)) if starts[i + 1] - starts[i] == 1]
    rows = blocks = pad = None
    if decodes:
        nblocks = (max(lens[i] for i in decodes) + block_size - 1) // block_size
        if len(decodes) == len(lens) and starts[-1] == len(lens):  # a decode-only step
            tables, dec_lens = block_tables, seq_lens
        else:
            rows = torch.tensor([starts[i] for i in decodes], dtype=torch.int64, device=device)
            idx = torch.tensor(decodes, dtype=torch.int64, device=device)
            tables, dec_lens = block_tables.index_select(0, idx), seq_lens.index_select(0, idx)
        blocks = tables[:, :nblocks].reshape(-1)
        j = torch.arange(nblocks * block_size, device=device)
        pad = (j >= dec_lens.unsqueeze(1)).view(len(decodes), 1, 1, -1)
    prefills = []
    for i, seq_len in enumerate(lens):
        s, e = starts[i], starts[i + 1]
        if e - s > 1:
            nblocks = (seq_len + block_size - 1) // block_size
            mask = causal_mask(e - s, seq_len, seq_len - (e - s), device)
            prefills.append((s, e, block_tables[i, :nblocks], seq_len, mask))
    return PagedAttentionPlan(rows, blocks, pad, prefills)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    plan: PagedAttentionPlan | None = None,
) -> torch.Tensor:
    """Causal attention of a step's queries against the paged cache. Request i's queries are
    q[query_start_loc[i]:query_start_loc[i+1]], the last tokens of its context of seq_lens[i]
    tokens, all of whose K/V are already in the cache. Returns [T, Hq, D].

    Decodes (one query) are done together in one batched product; prefill chunks one by one.
    `plan`: `plan_paged_attention` of these same batch tensors (built here when None)."""
    if plan is None:
        plan = plan_paged_attention(block_tables, seq_lens, query_start_loc, k_cache.shape[1])
    if plan.decode_blocks is not None and plan.decode_rows is None and not plan.prefills:
        return _decode_attention(q, k_cache, v_cache, plan.decode_blocks, plan.decode_pad, scale)
    out = torch.empty_like(q)
    if plan.decode_blocks is not None:
        rows = plan.decode_rows
        out[rows] = _decode_attention(q[rows], k_cache, v_cache, plan.decode_blocks, plan.decode_pad, scale)
    for s, e, blocks, seq_len, mask in plan.prefills:
        out[s:e] = _attend(q[s:e], gather_kv(k_cache, blocks, seq_len), gather_kv(v_cache, blocks, seq_len), scale, mask)
    return out


def _decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor, pad: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query per request: q [B, Hq, D] against the blocks of each request, gathered into
    [B, L, Hk, D] (L = blocks per request * block size), with pad [B, 1, 1, L] masked out."""
    _, _, hk, d = k_cache.shape
    b, hq, _ = q.shape
    length = pad.shape[-1]
    k = k_cache.index_select(0, blocks).view(b, length, hk, d).float()
    v = v_cache.index_select(0, blocks).view(b, length, hk, d).float()
    qg = q.float().reshape(b, hk, hq // hk, d)  # GQA: query heads grouped by their kv head
    scores = torch.matmul(qg, k.permute(0, 2, 3, 1)).mul_(scale)  # [B, Hk, g, L]
    scores.masked_fill_(pad, float("-inf"))
    out = torch.matmul(scores.softmax(dim=-1), v.transpose(1, 2))  # [B, Hk, g, D]
    return out.reshape(b, hq, d).to(q.dtype)


def merge_embeddings(inputs_embeds: torch.Tensor, mm_embeds: torch.Tensor, positions: torch.Tensor) -> None:
    """inputs_embeds [T, H] gets mm_embeds [M, H] at rows positions [M] (int64), in place."""
    inputs_embeds[positions] = mm_embeds.to(inputs_embeds.dtype)


PATCH_LAYOUTS = ("qwen2_vl", "patches")


def normalize_lut(
    mean: tuple[float, float, float], std: tuple[float, float, float], rescale_factor: float = 1 / 255
) -> torch.Tensor:
    """float32 [3, 256]: entry [c, v] is uint8 level v of channel c rescaled and normalised with
    transformers' numpy arithmetic (the PIL backends of its image processors): v * rescale_factor
    in float64, rounded to float32, then (x - mean[c]) / std[c] in float32. A family whose
    reference computes differently (torchvision's fused (v - mean / r) / (std / r)) builds its
    own table; the kernels only look values up, so every convention stays bit-exact."""
    levels = (torch.arange(256, dtype=torch.float64) * rescale_factor).to(torch.float32)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1)
    return ((levels.view(1, 256) - mean_t) / std_t).contiguous()


def check_patchify_args(
    pixels: torch.Tensor, lut: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int, layout: str
) -> tuple[int, int, int]:
    """Validates `normalize_patchify`'s inputs (shared by the Triton launcher); returns the
    patch grid (grid_t, grid_h, grid_w) of the output rows."""
    op = "normalize_patchify"
    if layout not in PATCH_LAYOUTS:
        raise ValueError(f"{op}: layout must be one of {PATCH_LAYOUTS}, got {layout!r}")
    if layout == "patches" and (merge_size != 1 or temporal_patch_size != 1):
        raise ValueError(f"{op}: layout 'patches' takes merge_size = temporal_patch_size = 1, "
                         f"got {merge_size} and {temporal_patch_size}")
    if pixels.dtype != torch.uint8 or pixels.dim() not in (3, 4) or pixels.shape[-1] != 3:
        raise ValueError(f"{op}: pixels must be uint8 [H, W, 3] or [T, H, W, 3], got {pixels.dtype} "
                         f"{tuple(pixels.shape)}")
    if lut.dtype != torch.float32 or tuple(lut.shape) != (3, 256) or lut.device != pixels.device:
        raise ValueError(f"{op}: lut must be float32 [3, 256] on the pixels' device ({pixels.device}), got "
                         f"{lut.dtype} {tuple(lut.shape)} on {lut.device}; build it with normalize_lut")
    if patch_size < 1 or merge_size < 1 or temporal_patch_size < 1:
        raise ValueError(f"{op}: patch_size, merge_size and temporal_patch_size must be at least 1, got "
                         f"{patch_size}, {merge_size}, {temporal_patch_size}")
    h, w = pixels.shape[-3], pixels.shape[-2]
    unit = patch_size * merge_size
    if h % unit or w % unit or h == 0 or w == 0:
        raise ValueError(
            f"{op}: image {h}x{w} must be a non-empty multiple of patch_size * merge_size = {unit} on both "
            "sides; resize it on the host first (e.g. Qwen2-VL's smart_resize)"
        )
    frames = pixels.shape[0] if pixels.dim() == 4 else temporal_patch_size
    if frames == 0 or frames % temporal_patch_size:
        raise ValueError(f"{op}: {frames} frames is not a positive multiple of temporal_patch_size = "
                         f"{temporal_patch_size}; repeat the last frame up to one first")
    return frames // temporal_patch_size, h // patch_size, w // patch_size


def normalize_patchify(
    pixels: torch.Tensor,
    lut: torch.Tensor,
    patch_size: int,
    merge_size: int = 1,
    temporal_patch_size: int = 1,
    layout: str = "qwen2_vl",
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Resized uint8 pixels → normalised patch rows: pixel level v of channel c becomes lut[c, v]
    (float32 [3, 256], e.g. from `normalize_lut`), then cast to out_dtype.

    pixels: one image [H, W, 3] (repeated over the temporal_patch_size frames of a patch) or
    frames [T, H, W, 3] (T a multiple of temporal_patch_size, consecutive frames forming a
    temporal patch); H, W multiples of patch_size * merge_size.

    layout "qwen2_vl" (Qwen2-VL's processors): [grid_t * grid_h * grid_w, 3 * tp * P * P], rows
    ordered (temporal patch, window row, window col, row in window, col in window), columns
    (channel, frame in the temporal patch, patch row, patch col). layout "patches":
    [grid_h * grid_w, 3 * P * P], rows row-major over the patch grid, columns (channel, patch
    row, patch col) — a Conv2d patch embedding's order; merge_size = temporal_patch_size = 1.
    Frames [T, H, W, 3] in layout "patches" give each frame's rows in turn (NVLM-D's tiles).
    The lookup is exact: for a table built with a family's own arithmetic, the output is bit
    for bit that family's reference processor output."""
    grid_t, gh, gw = check_patchify_args(pixels, lut, patch_size, merge_size, temporal_patch_size, layout)
    p, m, tp, c = patch_size, merge_size, temporal_patch_size, 3
    rows = grid_t * gh * gw
    # An image is one frame repeated over the temporal patch: look it up once, copy tp times.
    still = pixels.dim() == 3
    src_t = 1 if still else tp
    # Permute the uint8 pixels (a quarter of the bytes of float32) into the row layout
    # [grid_t, gh/m, gw/m, m, m, C, src_t, P, P], then one gather through the flattened table
    # (index = c * 256 + level, int32: index_select's fast path).
    u = pixels.reshape(grid_t, src_t, gh // m, m, p, gw // m, m, p, c).permute(0, 2, 5, 3, 6, 8, 1, 4, 7)
    idx = u.reshape(rows, c, src_t, p * p).to(torch.int32)
    idx += torch.arange(0, 256 * c, 256, dtype=torch.int32, device=pixels.device).view(1, c, 1, 1)
    x = lut.reshape(-1).index_select(0, idx.view(-1)).view(rows, c, src_t, p * p)
    out = torch.empty((rows, c, tp, p * p), dtype=out_dtype, device=pixels.device)
    out.copy_(x.expand(rows, c, tp, p * p))
    return out.view(rows, c * tp * p * p)


def cross_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    ranges: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Non-causal attention of each query to a row range of its request's paged sequence.

    Request i owns queries q[query_start_loc[i]:query_start_loc[i+1]] and the first
    seq_lens[i] rows stored at the blocks block_tables[i]. Query t attends to the rows
    [ranges[t, 0], ranges[t, 1]) (int32 [T, 2], 0 <= start <= end <= seq_lens[i]).

    An empty range (start == end) attends to ALL seq_lens[i] rows of its request: this is
    what transformers' Mllama computes for a text token that may see no image (its additive
    mask row is all "masked", and `full_text_row_masked_out_mask` then zeroes that row of the
    mask, leaving it unmasked). A request with seq_lens[i] == 0 has no rows: its queries get
    zeros (callers skip them). Returns [T, Hq, D] in q's dtype."""
    out = torch.zeros_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        s, e = starts[i], starts[i + 1]
        if e == s or seq_len == 0:
            continue
        k = gather_kv(k_cache, block_tables[i], seq_len)
        v = gather_kv(v_cache, block_tables[i], seq_len)
        lo, hi = ranges[s:e, 0].long(), ranges[s:e, 1].long()
        if bool(((lo < 0) | (hi < lo) | (hi > seq_len)).any()):
            raise ValueError(f"cross_attention: request {i} has a range outside [0, {seq_len}]")
        hq, hk = q.shape[1], k.shape[1]
        if hq != hk:
            k = k.repeat_interleave(hq // hk, dim=1)
            v = v.repeat_interleave(hq // hk, dim=1)
        qt, kt, vt = q[s:e].transpose(0, 1).float(), k.transpose(0, 1).float(), v.transpose(0, 1).float()
        scores = torch.matmul(qt, kt.transpose(1, 2)) * scale  # [H, Lq, S]
        j = torch.arange(seq_len, device=q.device).unsqueeze(0)  # [1, S]
        outside = (j < lo.unsqueeze(1)) | (j >= hi.unsqueeze(1))  # [Lq, S]
        outside &= (hi > lo).unsqueeze(1)  # empty range: every row is attended
        scores = scores.masked_fill(outside.unsqueeze(0), float("-inf"))
        out[s:e] = torch.matmul(torch.softmax(scores, dim=-1), vt).transpose(0, 1).to(q.dtype)
    return out


def check_resize_patchify_args(
    pixels: torch.Tensor,
    levels: torch.Tensor,
    y_starts: torch.Tensor,
    y_weights: torch.Tensor,
    x_starts: torch.Tensor,
    x_weights: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    origins: torch.Tensor,
    place: tuple[int, int],
    crop_size: int,
    patch_size: int,
) -> None:
    """Validates `resize_patchify`'s inputs (shared by the Triton launcher)."""
    op = "resize_patchify"
    dev = pixels.device
    if pixels.dtype != torch.uint8 or pixels.dim() != 3 or pixels.shape[-1] != 3 or pixels.numel() == 0:
        raise ValueError(f"{op}: pixels must be non-empty uint8 [H, W, 3], got {pixels.dtype} {tuple(pixels.shape)}")
    for name, t, dtype, dims in (
        ("levels", levels, torch.float32, 1), ("y_starts", y_starts, torch.int32, 1),
        ("y_weights", y_weights, torch.float32, 2), ("x_starts", x_starts, torch.int32, 1),
        ("x_weights", x_weights, torch.float32, 2), ("mean", mean, torch.float32, 1),
        ("std", std, torch.float32, 1), ("origins", origins, torch.int32, 2),
    ):
        if t.dtype != dtype or t.dim() != dims or t.device != dev or not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous {dtype} with {dims} dims on {dev}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")
    if levels.numel() != 256 or mean.numel() != 3 or std.numel() != 3:
        raise ValueError(f"{op}: levels must have 256 entries and mean/std 3")
    if y_weights.shape[0] != y_starts.numel() or x_weights.shape[0] != x_starts.numel():
        raise ValueError(f"{op}: weights must have one row per output row/column")
    if y_starts.numel() == 0 or x_starts.numel() == 0:
        raise ValueError(f"{op}: the resized image is empty")
    if origins.shape[-1] != 2 or origins.shape[0] == 0:
        raise ValueError(f"{op}: origins must be int32 [n_crops, 2] (top, left)")
    if crop_size < 1 or patch_size < 1 or crop_size % patch_size:
        raise ValueError(f"{op}: crop_size ({crop_size}) must be a positive multiple of patch_size ({patch_size})")
    if place[0] < 0 or place[1] < 0:
        raise ValueError(f"{op}: place must be non-negative, got {place}")


def resize_patchify(
    pixels: torch.Tensor,
    levels: torch.Tensor,
    y_starts: torch.Tensor,
    y_weights: torch.Tensor,
    x_starts: torch.Tensor,
    x_weights: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    origins: torch.Tensor,
    place: tuple[int, int],
    crop_size: int,
    patch_size: int,
) -> torch.Tensor:
    """uint8 pixels → a separable span resize onto a zero canvas → normalised crops as patch rows.

    pixels uint8 [H, W, 3]; level v becomes levels[v] (float32 [256], e.g. v * (1/255)). The
    resize is TensorFlow's `ScaleAndTranslate` form: output row r is
    sum_i y_weights[r, i] * input row (y_starts[r] + i) (rows first, float32, accumulated in i
    order), then the same over columns; taps past the input's edge have weight 0. The resized
    [Ho, Wo] image is clipped to [0, 1] and sits at `place` (top, left) on a canvas of zeros;
    each canvas value x becomes (x - mean[c]) / std[c]. Crop k is the crop_size² window of the
    canvas at origins[k] (top, left); it comes out as [(crop/P)², P * P * 3] rows, patches
    row-major, each flattened (patch row, patch col, channel) — Molmo's `images` layout.
    Returns float32 [n_crops, (crop/P)², P * P * 3]."""
    check_resize_patchify_args(pixels, levels, y_starts, y_weights, x_starts, x_weights, mean, std, origins,
                               place, crop_size, patch_size)
    h, w = pixels.shape[:2]
    x = levels[pixels.long()]  # [H, W, 3] float32
    rows = torch.zeros((y_starts.numel(), w, 3), dtype=torch.float32, device=pixels.device)
    for i in range(y_weights.shape[1]):
        src = (y_starts.long() + i).clamp(max=h - 1)
        rows += y_weights[:, i, None, None] * x[src]
    resized = torch.zeros((y_starts.numel(), x_starts.numel(), 3), dtype=torch.float32, device=pixels.device)
    for j in range(x_weights.shape[1]):
        src = (x_starts.long() + j).clamp(max=w - 1)
        resized += x_weights[None, :, j, None] * rows[:, src]
    resized.clamp_(0.0, 1.0)
    top, left = place
    ho, wo = resized.shape[:2]
    canvas_h = max(int(origins[:, 0].max()) + crop_size, top + ho)
    canvas_w = max(int(origins[:, 1].max()) + crop_size, left + wo)
    canvas = torch.zeros((canvas_h, canvas_w, 3), dtype=torch.float32, device=pixels.device)
    canvas[top : top + ho, left : left + wo] = resized
    canvas = (canvas - mean) / std
    p, n = patch_size, crop_size // patch_size
    crops = [canvas[int(t) : int(t) + crop_size, int(l) : int(l) + crop_size] for t, l in origins.tolist()]
    out = torch.stack(crops).reshape(len(crops), n, p, n, p, 3).permute(0, 1, 3, 2, 4, 5)
    return out.reshape(len(crops), n * n, p * p * 3).contiguous()
