"""Video: frame sampling, the even-count padding, duration and pixel limits, the malformed
corpus, and loading through MediaLoader. Clips are made here with PyAV."""

from __future__ import annotations

import io
import os

import av
import numpy as np
import pytest

from vlmserve.multimodal.media import MediaConfig, MediaError, MediaLoader
from vlmserve.multimodal.video import decode_video

from .conftest import data_url, gray_clip

DEFAULT = MediaConfig()


def _levels(frames: np.ndarray) -> list[int]:
    return [int(round(f.mean())) for f in frames]


def _assert_levels(frames: np.ndarray, indices: list[int]) -> None:
    got = _levels(frames)
    want = [15 * i % 256 for i in indices]
    assert all(abs(g - w) <= 6 for g, w in zip(got, want)), (got, want)


def test_frames_are_sampled_at_video_fps():
    video = decode_video(gray_clip(n=16, rate=8), DEFAULT)  # 2 s at 8 fps
    assert video.frames.shape == (4, 48, 64, 3) and video.frames.dtype == np.uint8
    assert video.fps == 2.0 and video.source_fps == 8.0 and video.duration == pytest.approx(2.0)
    assert video.timestamps.tolist() == pytest.approx([0.0, 0.5, 1.0, 1.5])
    _assert_levels(video.frames, [0, 4, 8, 12])


def test_fps_frame_counts_round_down_to_pairs_as_transformers_does():
    video = decode_video(gray_clip(n=10, rate=4), DEFAULT)  # 2.5 s → 5 by fps → 4, spaced 2.5
    assert video.timestamps.tolist() == pytest.approx([0.0, 0.5, 1.25, 1.75])
    _assert_levels(video.frames, [0, 2, 5, 7])


def test_odd_frame_count_is_padded_by_repeating_the_last_frame():
    video = decode_video(gray_clip(n=1, rate=4), DEFAULT)  # one frame → a pair
    assert len(video.frames) == 2
    assert np.array_equal(video.frames[-1], video.frames[-2])
    assert video.timestamps[-1] == video.timestamps[-2] == pytest.approx(0.0)


def test_frame_cap_spreads_samples_over_the_whole_video():
    video = decode_video(gray_clip(n=64, rate=8), MediaConfig(max_video_frames=4))  # 8 s
    assert len(video.frames) == 4 and video.fps == pytest.approx(0.5)
    assert video.timestamps.tolist() == pytest.approx([0.0, 2.0, 4.0, 6.0])
    _assert_levels(video.frames, [0, 16, 32, 48])


def test_source_slower_than_sampling_rate_gives_each_frame_once():
    video = decode_video(gray_clip(n=4, rate=1), DEFAULT)
    assert video.fps == 1.0 and video.timestamps.tolist() == pytest.approx([0, 1, 2, 3])
    _assert_levels(video.frames, [0, 1, 2, 3])


def test_video_longer_than_the_limit_is_refused_naming_it():
    with pytest.raises(MediaError, match="2.0 s exceeds.*max_video_duration_s=1.*--max-video-duration-s") as e:
        decode_video(gray_clip(n=16, rate=8), MediaConfig(max_video_duration_s=1.0))
    assert e.value.status_code == 400


def test_frames_over_the_frame_pixel_cap_are_downscaled_keeping_aspect():
    video = decode_video(gray_clip(n=4, rate=2, size=(128, 96)), MediaConfig(max_video_frame_pixels=64 * 48))
    assert video.frames.shape[1:] == (48, 64, 3)


def test_frame_over_max_image_pixels_is_refused():
    with pytest.raises(MediaError, match="video frame of 128x96.*--max-image-pixels"):
        decode_video(gray_clip(n=2, rate=2, size=(128, 96)), MediaConfig(max_image_pixels=5000))


@pytest.mark.parametrize("codec, fmt", [("libx264", "matroska"), ("h264", "mp4"), ("libvpx", "webm")])
def test_other_codecs_and_containers_decode(codec, fmt):
    try:
        av.Codec(codec, "w")
    except (av.FFmpegError, ValueError):
        pytest.skip(f"this PyAV build has no {codec} encoder")
    video = decode_video(gray_clip(n=8, rate=4, codec=codec, fmt=fmt), DEFAULT)
    assert video.frames.shape == (4, 48, 64, 3)
    _assert_levels(video.frames, [0, 2, 4, 6])


def test_decoded_arrays_are_read_only():
    video = decode_video(gray_clip(n=4, rate=2), DEFAULT)
    with pytest.raises(ValueError):
        video.frames[0, 0, 0, 0] = 1


# -- the malformed corpus --------------------------------------------------------------------

def _empty(fmt: str) -> bytes:
    """A container with a video stream header and no frames."""
    out = io.BytesIO()
    container = av.open(out, "w", format=fmt)
    stream = container.add_stream("mpeg4", rate=8)
    stream.width, stream.height = 64, 48
    container.start_encoding()
    container.close()
    return out.getvalue()


CLIP = gray_clip(n=16, rate=8)
CORPUS = {
    "garbage": os.urandom(8192),
    "truncated_half": CLIP[: len(CLIP) // 2],
    "truncated_header": CLIP[:100],
    "no_frames_mp4": _empty("mp4"),
    "no_frames_mkv": _empty("matroska"),
    "png_as_video": bytes.fromhex("89504e470d0a1a0a") + os.urandom(64),
    # Valid, but a demuxer outside the allow-list: shows the list is what FFmpeg probes.
    "nut_container": gray_clip(n=4, rate=2, fmt="nut"),
    "concat_script": b"ffconcat version 1.0\nfile /etc/hostname\n",  # would read a local file
    "hls_playlist": b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nhttp://169.254.169.254/a.ts\n",
}


@pytest.mark.parametrize("name", sorted(CORPUS))
async def test_malformed_video_is_a_4xx(name):
    with pytest.raises(MediaError) as e:
        await MediaLoader().load_video(data_url(CORPUS[name], "video/mp4"))
    assert 400 <= e.value.status_code < 500


# -- through the loader ----------------------------------------------------------------------

async def test_video_is_decoded_once_and_shared_read_only():
    loader = MediaLoader()
    url = data_url(CLIP, "video/mp4")
    first = await loader.load_video(url)
    second = await loader.load_video(url)
    assert second is first and (loader.decodes, loader.cache_hits) == (1, 1)
    assert not first.frames.flags.writeable


async def test_video_from_a_local_file_and_over_http(tmp_path, server):
    (tmp_path / "clip.mp4").write_bytes(CLIP)
    server.route("/clip.mp4", body=CLIP)
    loader = MediaLoader(MediaConfig(allowed_local_media_path=str(tmp_path), allow_private_networks=True))
    from_file = await loader.load_video(f"file://{tmp_path}/clip.mp4")
    over_http = await loader.load_video(server.url("/clip.mp4"))
    assert from_file.frames.shape == over_http.frames.shape == (4, 48, 64, 3)


async def test_video_byte_cap_is_its_own_limit():
    loader = MediaLoader(MediaConfig(max_video_bytes=1000))
    with pytest.raises(MediaError, match="--max-video-bytes") as e:
        await loader.load_video(data_url(CLIP, "video/mp4"))
    assert e.value.status_code == 413
