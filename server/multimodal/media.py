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

The public types (MediaError, MediaConfig, VideoFrames) live in `types.py`, which imports no
stage of the pipeline; they are re-exported here for callers of the loader.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from PIL import Image

from vlmserve.multimodal import decode, fetch, hashing, video
from vlmserve.multimodal.ssrf import Resolver
from vlmserve.multimodal.types import MediaConfig, MediaError, VideoFrames

__all__ = ["MediaConfig", "MediaError", "MediaLoader", "VideoFrames"]


class MediaLoader:
    """Resolves media references and decodes them off the event loop.

    Thread-safety: the cache and counters are guarded by a lock (decodes run in the pool).
    `resolver` (host, port) -> addresses, sync or async, replaces DNS (tests map names to
    loopback with it); every address it returns is still vetted by the SSRF policy.
    """

    def __init__(self, config: MediaConfig | None = None, *, resolver: Resolver | None = None) -> None:
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
