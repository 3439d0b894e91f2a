"""Which frames of a video to keep: transformers' `Qwen2VLVideoProcessor.sample_frames` with
fps sampling, exactly (transformers 5.x, `video_processing_qwen2_vl.py`).

For a clip of `total` frames at `source_fps`, sampled at `fps`:
  max_frames' = floor(min(max_frames, total) / tp) * tp
  n = clamp(total / source_fps * fps, min=min_frames) capped by max_frames' and total
  n = floor(n / tp) * tp
  indices = int(arange(0, total, total / n))   (float32 steps, truncated, as torch does)
Frame count from duration x fps, raised to min_frames (a short clip keeps more frames than
fps gives), capped by max_frames and the clip, rounded down to the temporal patch size.

One deviation: a clip with fewer frames than the temporal patch size (1 frame when tp = 2)
makes transformers divide by zero; here it keeps its frames (the decoder then pads to a pair).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def fps_frame_indices(total: int, source_fps: float, fps: float, *, min_frames: int, max_frames: int,
                      temporal_patch_size: int = 2) -> np.ndarray:
    """int64 [n] indices into the clip's decoded frames, increasing."""
    if total < 1 or source_fps <= 0 or fps <= 0:
        raise ValueError(f"frame sampling needs frames and rates > 0, got total={total}, "
                         f"source_fps={source_fps}, fps={fps}")
    tp = temporal_patch_size
    cap = math.floor(min(max_frames, total) / tp) * tp
    n = total / source_fps * fps
    n = min(max(n, min_frames), cap, total)
    n = math.floor(n / tp) * tp
    if n == 0:
        return np.arange(total, dtype=np.int64)
    # torch.arange over a float step, then .int(): the same float32 rounding as transformers.
    return torch.arange(0, total, total / n).int().numpy().astype(np.int64)
