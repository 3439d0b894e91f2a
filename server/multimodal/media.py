"""Media references → decoded media: the one entry point the API layer calls.

    loader = MediaLoader(MediaConfig(...))
    image = await loader.load_image(url)    # PIL.Image.Image, mode "RGB", read-only; raises MediaError
    video = await loader.load_video(url)    # VideoFrames; raises MediaError

A reference is a `data:` URL (base64), an `http(s)://` URL (fetched by `fetch.py` behind the
SSRF guard of `ssrf.py`, time and byte capped) or a `file://` URL under
`allowed_local_media_path`. Bytes are decoded by `decode.py` (images) and `video.py` (video)
in a bounded thread pool, never on the event loop, and decoded results are cached by the
content hash of the raw bytes (`hashing.py`).

Decoded results are shared, not copied: the same bytes give every caller the same cached
object (`Image.copy` of a 12 MP photo is ~36 MB and milliseconds per request). Callers treat
images and frames as read-only: resize / convert / np.asarray (which return new objects) are
fine; paste, putpixel, thumbnail, draw or any other in-place edit must work on their own
`image.copy()`. The family processors only resize and convert.

This module owns the public types (MediaError, MediaConfig, VideoFrames); the submodules
import them from here, so MediaLoader imports the submodules when it is built, not at module
import time (no import cycle whichever module is imported first).

Every MediaError message names what was wrong, the limit or the allowed form, and the server
flag that changes it. Flags are the field names with dashes (`--max-image-pixels`), except
`allow_private_networks`, whose flag is `--allow-private-media-urls`.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from vlmserve.multimodal.ssrf import Resolver

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


class MediaLoader:
    """Resolves media references and decodes them off the event loop.

    Thread-safety: the cache and counters are guarded by a lock (decodes run in the pool).
    `resolver` (host, port) -> addresses, sync or async, replaces DNS (tests map names to
    loopback with it); every address it returns is still vetted by the SSRF policy.
    """

    def __init__(self, config: MediaConfig | None = None, *, resolver: Resolver | None = None) -> None:
        from vlmserve.multimodal import decode, fetch, hashing, video

        self.config = config or MediaConfig()
        self._decode, self._video, self._hashing = decode, video, hashing
        self._fetcher = fetch.MediaFetcher(self.config, resolver=resolver)
        self._pool = ThreadPoolExecutor(max_workers=self.config.workers, thread_name_prefix="media-decode")
        self._cache = hashing.ByteLRU(self.config.cache_bytes)
        self._lock = threading.Lock()
        self._decodes = 0
        # The semaphore keeps waiting decodes as coroutines (cheap, cancellable) instead of a
        # growing executor queue holding raw bytes; it is bound to one loop, so it is made
        # per running loop.
        self._sems: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Semaphore]] = {}

    # Counters for /metrics.
    @property
    def cache_hits(self) -> int:
        return self._cache.hits

    @property
    def cache_misses(self) -> int:
        return self._cache.misses

    @property
    def decodes(self) -> int:
        """Decodes actually run (a cache hit runs none)."""
        return self._decodes

    async def load_image(self, url: str) -> Image.Image:
        """The decoded RGB image, shared with other callers of the same bytes: read-only."""
        raw = await self._fetcher.fetch(url, kind="image")
        return await self._run(self._image_job, raw)

    async def load_video(self, url: str) -> VideoFrames:
        raw = await self._fetcher.fetch(url, kind="video")
        return await self._run(self._video_job, raw)

    def close(self) -> None:
        """Stops the decode threads once their current work is done."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- worker side ---------------------------------------------------------------------

    def _image_job(self, raw: bytes) -> Image.Image:
        key = "image:" + self._hashing.content_hash(raw)
        with self._lock:
            cached = self._cache.get(key)
        if cached is None:
            cached = self._decode.decode_image(raw, max_pixels=self.config.max_image_pixels)
            with self._lock:
                self._decodes += 1
                self._cache.put(key, cached, self._decode.image_nbytes(cached))
        return cached  # shared, read-only by contract (see the module docstring)

    def _video_job(self, raw: bytes) -> VideoFrames:
        key = "video:" + self._hashing.content_hash(raw)
        with self._lock:
            cached = self._cache.get(key)
        if cached is None:
            cached = self._video.decode_video(raw, self.config)
            with self._lock:
                self._decodes += 1
                self._cache.put(key, cached, cached.nbytes)
        return cached  # read-only arrays: safe to share

    async def _run(self, job: Callable[[bytes], Any], raw: bytes) -> Any:
        loop = asyncio.get_running_loop()
        async with self._semaphore(loop):
            return await loop.run_in_executor(self._pool, job, raw)

    def _semaphore(self, loop: asyncio.AbstractEventLoop) -> asyncio.Semaphore:
        entry = self._sems.get(id(loop))
        if entry is None or entry[0] is not loop:
            entry = (loop, asyncio.Semaphore(self.config.workers))
            self._sems = {id(loop): entry}  # one serving loop; drop semaphores of old loops
        return entry[1]
