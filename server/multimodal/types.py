"""The media pipeline's shared types: the limits (MediaConfig), the error every stage raises
(MediaError) and decoded video (VideoFrames). Every stage (fetch, ssrf, decode, video, the
loader) imports them from here; this module imports none of them.

Every MediaError message names what was wrong, the limit or the allowed form, and the server
flag that changes it. Flags are the field names with dashes (`--max-image-pixels`), except
`allow_private_networks`, whose flag is `--allow-private-media-urls`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import numpy as np

MiB = 1024 * 1024


class MediaError(ValueError):
    """Bad media from the client. `status_code` is the HTTP status to answer with."""

    def __init__(self, message: str, status_code: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.param = param


@dataclass(frozen=True)
class MediaConfig:
    """Limits and policy of the media pipeline. Built once, validated, read-only."""

    # 50 MP covers every camera/phone photo (a 48 MP sensor is 8064x6048 = 48.8 MP) while
    # bounding one decoded RGBA image at 200 MB. It is below Pillow's own bomb limit
    # (~89 MP warning, ~179 MP error), so our check, with our message, always fires first.
    max_image_pixels: int = 50_000_000
    max_media_bytes: int = 20 * MiB  # encoded bytes of one image (data:, http, file)
    max_video_bytes: int = 128 * MiB  # encoded bytes of one video
    # Whole-fetch budgets (all redirect hops, connect and body), so a server that trickles
    # bytes cannot hold a request open past them.
    image_timeout_s: float = 5.0
    video_timeout_s: float = 30.0
    max_redirects: int = 3
    # None: any public host. Otherwise exact host names, or "*.example.com" for subdomains.
    allowed_media_domains: tuple[str, ...] | None = None
    # Opt-in to loopback, RFC1918, CGNAT, link-local and ULA addresses. Cloud metadata
    # addresses and names, multicast, unspecified and reserved addresses stay refused.
    allow_private_networks: bool = False
    allowed_local_media_path: str | None = None  # None: file:// URLs are refused
    video_fps: float = 2.0  # frames sampled per second of video
    max_video_frames: int = 32  # even: Qwen2-VL groups frames in temporal pairs
    # A clip sampled to fewer frames than this keeps this many (transformers' Qwen2-VL min_frames).
    min_video_frames: int = 4
    max_video_duration_s: float = 300.0
    # Larger frames are downscaled (aspect kept) while decoding, bounding one video at
    # max_video_frames * 1920*1080*3 bytes (~200 MB at the defaults).
    max_video_frame_pixels: int = 1920 * 1080
    workers: int = 4  # decode threads; at most this many decodes run at once
    cache_bytes: int = 256 * MiB  # decoded-media LRU, by decoded size; 0 disables it

    def __post_init__(self) -> None:
        for name in ("max_image_pixels", "max_media_bytes", "max_video_bytes", "max_video_frames",
                     "min_video_frames", "max_video_frame_pixels", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("image_timeout_s", "video_timeout_s", "video_fps", "max_video_duration_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be greater than 0, got {getattr(self, name)}")
        if self.max_redirects < 0 or self.cache_bytes < 0:
            raise ValueError("max_redirects and cache_bytes must be at least 0, got "
                             f"{self.max_redirects} and {self.cache_bytes}")
        if self.max_video_frames % 2:
            raise ValueError(f"max_video_frames must be even (frames are grouped in temporal "
                             f"pairs), got {self.max_video_frames}")
        if self.allowed_media_domains is not None:
            if isinstance(self.allowed_media_domains, str):
                raise ValueError("allowed_media_domains must be a list of host names, got a string")
            domains = tuple(d.strip().lower().rstrip(".") for d in self.allowed_media_domains)
            if not all(domains):
                raise ValueError(f"allowed_media_domains has an empty entry: {self.allowed_media_domains!r}")
            object.__setattr__(self, "allowed_media_domains", domains)
        if self.allowed_local_media_path is not None:
            path = os.fspath(self.allowed_local_media_path)
            if not os.path.isdir(path):
                raise ValueError(f"allowed_local_media_path must be an existing directory, got {path!r}")
            object.__setattr__(self, "allowed_local_media_path", os.path.realpath(path))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@dataclass(frozen=True)
class VideoFrames:
    """Frames sampled from one video. Arrays are read-only: cached results are shared."""

    frames: np.ndarray  # uint8 [N, H, W, 3] RGB, N even and >= 2
    fps: float  # sampling rate of `frames` (frames per second of video)
    timestamps: np.ndarray  # float64 [N] seconds from the start; a padded frame repeats its time
    source_fps: float  # the stream's own frame rate (0.0 when the container does not say)
    duration: float  # seconds

    @property
    def nbytes(self) -> int:
        return int(self.frames.nbytes + self.timestamps.nbytes)
