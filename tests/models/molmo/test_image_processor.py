"""Molmo's image geometry against an oracle that follows the official processor's steps
(crop-order patch numbering, the row/column transpose, the inverse mapping of
`build_image_input_idx`), over image sizes from tiny to large and extreme aspect ratios, and
over other crop settings; plus the settings' sources and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from vlmserve.models.molmo.image_processor import MolmoImageProcessor, select_tiling

TOKENS = {"im_start": 1000, "im_end": 1001, "im_patch": 1002, "im_col": 1003}


def official_layout(ip: MolmoImageProcessor, h: int, w: int):
    """(tokens, image_input_idx [n_crops + 1, tokens per crop]) the way the official code
    derives them: number each crop's valid pooled cells crop by crop, transpose the crop grid
    to raster order, invert the permutation onto the <im_patch> positions."""
    p, (lm, rm), th, tw = ip.image_patch_size, ip.overlap_margins, ip.image_token_length_h, ip.image_token_length_w
    crop_patches = ip.base_image_input_size[0] // p
    window = crop_patches - lm - rm
    rows, cols = select_tiling(h - p * (lm + rm), w - p * (lm + rm), window * p, ip.max_crops)
    order, on = [], 0
    for i in range(rows):
        for j in range(cols):
            ch = window + (lm if i == 0 else 0) + (rm if i == rows - 1 else 0)
            cw = window + (lm if j == 0 else 0) + (rm if j == cols - 1 else 0)
            ph, pw = (ch + 1) // 2, (cw + 1) // 2
            frame = np.full((th, tw), -1)
            y0, x0 = (0 if i == 0 else lm // 2), (0 if j == 0 else lm // 2)
            frame[y0 : y0 + ph, x0 : x0 + pw] = np.arange(on, on + ph * pw).reshape(ph, pw)
            order.append(frame)
            on += ph * pw
    order = np.stack(order).reshape(-1)
    raster = np.stack(order.reshape(rows, cols, th, tw).transpose(0, 2, 1, 3).reshape(-1))
    valid = order >= 0
    order[valid] = raster[raster >= 0]
    gh, gw = (rows * window + lm + rm + 1) // 2, (cols * window + lm + rm + 1) // 2
    hi = np.concatenate([[TOKENS["im_start"]], np.tile([TOKENS["im_patch"]] * gw + [TOKENS["im_col"]], gh),
                         [TOKENS["im_end"]]])
    glob = np.concatenate([[TOKENS["im_start"]], np.tile([TOKENS["im_patch"]] * tw + [TOKENS["im_col"]], th),
                           [TOKENS["im_end"]]])
    tokens = np.concatenate([glob, hi])
    order = np.concatenate([np.arange(th * tw), np.where(order >= 0, order + th * tw, -1)])
    patch_positions = np.flatnonzero(tokens == TOKENS["im_patch"])
    inverse = np.zeros(len(patch_positions), dtype=np.int64)
    ok = order >= 0
    inverse[order[ok]] = np.arange(ok.sum())
    sparse = np.full(order.shape, -1)
    sparse[ok] = inverse
    idx = np.where(sparse >= 0, patch_positions[np.maximum(sparse, 0)], -100).reshape(-1, th * tw)
    return tokens, idx


SIZES = [(375, 500), (900, 300), (40, 56), (1, 1), (336, 336), (1080, 1920), (3000, 4000), (200, 2600),
         (2600, 200), (700, 701), (113, 450), (999, 1001)]


@pytest.mark.parametrize("h, w", SIZES)
@pytest.mark.parametrize("settings", [{}, {"max_crops": 6}, {"overlap_margins": (2, 2)}, {"overlap_margins": (6, 2)}])
def test_layout_matches_the_official_construction(h, w, settings):
    ip = MolmoImageProcessor(**settings)
    plan = ip.plan(h, w, TOKENS)
    tokens, idx = official_layout(ip, h, w)
    assert plan["tokens"].tolist() == tokens.tolist()
    assert len(tokens) == ip.num_tokens(h, w)
    positions = np.flatnonzero(plan["tokens"] == TOKENS["im_patch"])
    rows = plan["feature_rows"]
    ours = np.where(rows >= 0, positions[np.maximum(rows, 0)], -100)
    assert ours.tolist() == idx.tolist()
    n_crops = rows.shape[0] - 1
    assert n_crops <= ip.max_crops and plan["image_masks"].shape == (n_crops + 1, ip.crop_patches**2)
    assert (plan["image_masks"][-1] == -1).all() and (plan["image_masks"][:-1] >= 0).all()


def test_tiling_grows_with_the_image_up_to_max_crops():
    ip = MolmoImageProcessor()
    assert ip.tiling(40, 56) == (1, 1)
    assert ip.tiling(375, 500) == (2, 2)
    assert ip.tiling(900, 300) == (4, 1)
    r, c = ip.tiling(3000, 4000)
    assert r * c <= 12 and (r, c) == (3, 4)


def test_settings_come_from_tokenizer_config_as_the_official_merge_does():
    ip = MolmoImageProcessor.from_tokenizer_config({"max_crops": 4, "unrelated": 1})
    assert ip.max_crops == 4 and ip.overlap_margins == (4, 4)
    assert MolmoImageProcessor.from_tokenizer_config({}) == MolmoImageProcessor()


@pytest.mark.parametrize("settings, error", [({"overlap_margins": (3, 3)}, "even"), ({"overlap_margins": (2, 3)}, "even"),
                                             ({"image_token_length_w": 10}, "half the patches"),
                                             ({"image_padding_mask": False}, "masks")])
def test_bad_settings_are_refused(settings, error):
    with pytest.raises(ValueError, match=error):
        MolmoImageProcessor(**settings)


def test_extreme_aspect_ratio_is_a_clear_error():
    with pytest.raises(ValueError, match="aspect ratio"):
        MolmoImageProcessor().plan(1, 5000, TOKENS)
