"""Video frame sampling against transformers' `Qwen2VLVideoProcessor.sample_frames` (fps
sampling) over a grid of (frame count, source fps, target fps), including clips shorter than
min_frames and 10+ fps clips; then the decoder keeps exactly those frames of a real clip."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import pytest

from vlmserve.multimodal.frame_sampling import fps_frame_indices
from vlmserve.multimodal.media import MediaConfig
from vlmserve.multimodal.video import decode_video
from tests.models.qwen2_vl.test_video_processor import hf_video  # noqa: F401 (the reference fixture)

COUNTS = (2, 3, 5, 7, 10, 16, 33, 64, 121, 600)
SOURCE_FPS = (1.0, 4.0, 10.0, 24.0, 30000 / 1001, 60.0)
TARGET_FPS = (0.5, 1.0, 2.0, 3.3)


@pytest.mark.parametrize("max_frames", [32, 768])
def test_indices_equal_transformers_over_the_grid(hf_video, max_frames):  # noqa: F811
    from transformers.video_utils import VideoMetadata

    processor = hf_video.Qwen2VLVideoProcessor()
    checked = 0
    for total in COUNTS:
        for source in SOURCE_FPS:
            for fps in TARGET_FPS:
                meta = VideoMetadata(total_num_frames=total, fps=source)
                want = processor.sample_frames(meta, fps=fps, min_frames=4, max_frames=max_frames).tolist()
                got = fps_frame_indices(total, source, fps, min_frames=4, max_frames=max_frames).tolist()
                assert got == want, (total, source, fps, max_frames)
                checked += 1
    assert checked == len(COUNTS) * len(SOURCE_FPS) * len(TARGET_FPS)
    # Clips shorter than min_frames after fps sampling keep min_frames (as far as the clip allows).
    assert len(fps_frame_indices(30, 30.0, 2.0, min_frames=4, max_frames=max_frames)) == 4
    assert fps_frame_indices(3, 30.0, 2.0, min_frames=4, max_frames=max_frames).tolist() == [0, 1]


def test_a_single_frame_clip_keeps_its_frame():
    # transformers divides by zero here; the clip keeps its one frame (padded to a pair later).
    assert fps_frame_indices(1, 24.0, 2.0, min_frames=4, max_frames=32).tolist() == [0]


def _clip(n: int, rate: Fraction | int) -> bytes:
    """n distinct frames (a moving gradient), mpeg4 in mp4."""
    out = io.BytesIO()
    yy, xx = np.mgrid[0:32, 0:48]
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        for i in range(n):
            rgb = np.stack([(xx * 5 + 11 * i) % 256, (yy * 7 + 3 * i) % 256, np.full_like(xx, (29 * i) % 256)], -1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb.astype(np.uint8), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def _all_frames(raw: bytes) -> np.ndarray:
    with av.open(io.BytesIO(raw)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.mark.parametrize("n, rate, fps", [
    (3, 30, 2.0),                      # shorter than min_frames: 2 frames
    (10, 4, 2.0),                      # 2.5 s: 5 frames by fps, rounded down to 4
    (20, 10, 1.0),                     # 10 fps, 2 s: min_frames 4 wins over 2
    (90, Fraction(30000, 1001), 2.0),  # 29.97 fps, 3 s: 6 frames
    (250, 25, 2.0),                    # 10 s: 20 frames
    (400, 25, 2.0),                    # 16 s: 32 by fps, the max_video_frames cap
])
def test_decoder_keeps_exactly_the_sampled_frames(n, rate, fps):
    raw = _clip(n, rate)
    config = MediaConfig(video_fps=fps, max_video_frames=32, max_video_duration_s=60)
    video = decode_video(raw, config)
    reference = _all_frames(raw)
    indices = fps_frame_indices(len(reference), float(rate), fps, min_frames=4, max_frames=32)
    assert video.frames.shape[0] == len(indices)
    assert np.array_equal(video.frames, reference[indices])
    assert video.timestamps.tolist() == pytest.approx((indices / float(rate)).tolist())
