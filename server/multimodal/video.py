"""Video bytes → sampled RGB frames (`VideoFrames`), with PyAV. Runs in a worker thread.

Sampling, when the stream states its frame rate: by frame index exactly as transformers'
Qwen2-VL video processor samples at fps (`frame_sampling.fps_frame_indices`: duration x
`video_fps` frames, at least `min_video_frames`, at most `max_video_frames` and the clip,
rounded down to pairs, spaced by total / n). The frame count is the stream's, else duration x
rate. Without a stated rate: frames at `video_fps` per second by timestamp (the first decoded
frame at or after each target time, half a frame of tolerance), at most `max_video_frames`,
spread over the whole duration when that cap binds. Decoding stops after the last frame kept,
so the cost is bounded by the sampled span, not by the file. An odd count is padded by
repeating the last frame: Qwen2-VL packs frames in temporal pairs.

Limits, checked before any frame is decoded where the container says enough:
  duration > max_video_duration_s          → 400
  coded frame size > max_image_pixels       → 400 (no real video is 50 MP per frame)
  frame size > max_video_frame_pixels       → downscaled, aspect kept (4K phone clips work)

Only ordinary file containers are demuxed (`format_whitelist`): playlist and concat demuxers
(hls, dash, concat, image2...) would open further URLs or local paths named inside the file,
an SSRF and local-file read by another route.
"""

from __future__ import annotations

import io
import math

import av
import numpy as np

from vlmserve.multimodal.decode import check_pixels
from vlmserve.multimodal.frame_sampling import fps_frame_indices
from vlmserve.multimodal.types import MediaConfig, MediaError, VideoFrames

_CONTAINERS = "mov,mp4,matroska,webm,avi,mpegts,mpeg,flv,ogg"
_OPEN_OPTIONS = {"format_whitelist": _CONTAINERS, "enable_drefs": "0"}
_ERRORS = (av.FFmpegError, ValueError, EOFError, IndexError)


def _why(e: Exception) -> str:
    return str(getattr(e, "strerror", None) or e)  # FFmpeg's reason, without "'<none>'"


def _open(raw: bytes):
    try:
        return av.open(io.BytesIO(raw), mode="r", container_options=_OPEN_OPTIONS)
    except _ERRORS as e:
        raise MediaError(f"cannot read the video ({_why(e)}): it is truncated, corrupt, or not "
                         f"in a supported container ({_CONTAINERS.replace(',', ', ')})") from None


def _known_duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    return None


def _demuxed_duration(raw: bytes, limit: float) -> float | None:
    """Duration from packet timestamps, for containers that do not state it (demuxing only:
    no decoding). Stops as soon as the limit is passed."""
    end = None
    with _open(raw) as container:
        stream = container.streams.video[0]
        tb = stream.time_base
        start = stream.start_time or 0
        try:
            for packet in container.demux(stream):
                if packet.pts is None or tb is None:
                    continue
                t = float((packet.pts - start + (packet.duration or 0)) * tb)
                end = t if end is None else max(end, t)
                if end > limit:
                    break
        except _ERRORS as e:
            raise MediaError(f"cannot read the video: it is truncated or corrupt ({_why(e)})") from None
    return end


def _too_long(duration: float, limit: float) -> MediaError:
    return MediaError(f"video of {duration:.1f} s exceeds the limit max_video_duration_s="
                      f"{limit:g} s; the server's --max-video-duration-s raises it, or send a "
                      "shorter clip")


def _plan(duration: float | None, fps: float, max_frames: int) -> tuple[np.ndarray, float]:
    """Target times (seconds) and the sampling rate they represent."""
    if duration is None:  # unknown length: sample at fps until the frame cap or the end
        return np.arange(max_frames) / fps, fps
    n = max(1, math.ceil(duration * fps - 1e-9))
    if n <= max_frames:
        return np.arange(n) / fps, fps
    return np.linspace(0.0, duration, max_frames, endpoint=False), max_frames / duration


def _output_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    # Even sizes: swscale and the yuv420 sources handle them exactly.
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


def decode_video(raw: bytes, config: MediaConfig) -> VideoFrames:
    limit = config.max_video_duration_s
    with _open(raw) as container:
        if not container.streams.video:
            raise MediaError("the video file has no video stream")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if ctx.width and ctx.height:
            check_pixels(ctx.width, ctx.height, config.max_image_pixels, what="video frame")
        rate = stream.average_rate or stream.guessed_rate
        source_fps = float(rate) if rate else 0.0
        duration = _known_duration(container, stream)
        if duration is None:
            duration = _demuxed_duration(raw, limit)
        if duration is not None and duration > limit:
            raise _too_long(duration, limit)
        fps = min(config.video_fps, source_fps) if source_fps else config.video_fps
        targets, sampled_fps = _plan(duration, fps, config.max_video_frames)
        tolerance = 0.5 / source_fps if source_fps else 0.5 / fps
        keep: set[int] | None = None  # frame indices to keep (by index, transformers' rule)
        total = stream.frames or (round(duration * source_fps) if duration and source_fps else 0)
        if source_fps and total:
            indices = fps_frame_indices(total, source_fps, config.video_fps, min_frames=config.min_video_frames,
                                        max_frames=config.max_video_frames)
            keep, last_kept = set(indices.tolist()), int(indices[-1])
            sampled_fps = len(indices) / (total / source_fps)
        tb = stream.time_base
        start = stream.start_time or 0

        frames: list[np.ndarray] = []
        times: list[float] = []
        size: tuple[int, int] | None = None
        j = 0
        index = -1
        try:
            for frame in container.decode(stream):
                index += 1
                if frame.pts is not None and tb is not None:
                    t = float((frame.pts - start) * tb)
                else:
                    t = index / (source_fps or fps)
                if t > limit:  # the container understated its length
                    raise _too_long(t, limit)
                if keep is not None:
                    if index not in keep:
                        if index > last_kept:
                            break
                        continue
                elif t + tolerance < targets[j]:
                    continue
                if size is None:
                    check_pixels(frame.width, frame.height, config.max_image_pixels, "video frame")
                    size = _output_size(frame.width, frame.height, config.max_video_frame_pixels)
                # Every frame is brought to the first sampled frame's size, so a stream that
                # changes resolution mid-way still stacks into one array.
                rgb = frame.reformat(width=size[0], height=size[1], format="rgb24").to_ndarray()
                frames.append(rgb)
                times.append(max(t, 0.0))
                if keep is not None:
                    if index == last_kept:
                        break
                    continue
                while j < len(targets) and targets[j] <= t + tolerance:
                    j += 1
                if j == len(targets):
                    break
        except _ERRORS as e:
            raise MediaError(f"cannot decode the video: it is truncated or corrupt ({_why(e)})") from None

    if not frames:
        raise MediaError("the video has no decodable frames")
    if len(frames) % 2:
        frames.append(frames[-1])
        times.append(times[-1])
    stacked = np.stack(frames)  # [N, H, W, 3] uint8
    stamps = np.asarray(times, dtype=np.float64)
    stacked.flags.writeable = False  # shared through the cache
    stamps.flags.writeable = False
    if duration is None:
        duration = times[-1] + (1.0 / source_fps if source_fps else 0.0)
    return VideoFrames(frames=stacked, fps=float(sampled_fps), timestamps=stamps,
                       source_fps=source_fps, duration=float(duration))
