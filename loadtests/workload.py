"""Request bodies per scenario: what each arrival asks for.

| scenario    | each request |
|-------------|--------------|
| steady, spike, ramp | one 224 x 224 image + a question (the arrival profile differs) |
| image-heavy | one image: 224 x 224 (50 %), 1280 x 720 (30 %), 1920 x 1080 (20 %) |
| multi-image | 2-4 images of 224 x 224 |
| multi-turn  | sessions of --turns turns over one image; turn k carries turns < k as history |
| video       | one 8-frame 224 x 224 clip |
| text-only   | a shared system prompt + a question of 20-400 words |

Media come from a small pool (same bytes: the server's caches can hit) with probability
--image-reuse, else are unique (every cache misses); each request records which it meant.
Multi-turn sessions miss on turn 0 and hit after it. Every body streams with usage.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from loadtests import media

SCENARIOS = ("steady", "spike", "ramp", "image-heavy", "multi-image", "multi-turn", "video", "text-only")
POOL_SIZE = 4
VIDEO = (224, 224, 8, 4)  # w, h, frames, fps
_WORDS = ("image", "colour", "shape", "left", "right", "scene", "object", "describe", "count", "where", "light",
          "texture", "corner", "centre", "background", "pattern", "detail", "edge", "small", "large")
_SYSTEM = "You are a careful assistant. Answer briefly and precisely, using only what the input shows."


@dataclass(frozen=True)
class PlannedRequest:
    index: int
    kind: str  # e.g. "image:1080p", "images:3", "turn:2", "video", "text"
    body: dict[str, Any]
    media: tuple[str, ...]  # media keys ("image:WxH", "video:WxHxF"), for image-token accounting
    cache: str | None  # "hit" | "miss" (what the request meant to do to the caches); None: no media


@dataclass(frozen=True)
class WorkloadOptions:
    model: str
    max_tokens: int = 64
    temperature: float = 0.0
    ignore_eos: bool = False
    image_reuse: float = 0.5
    turns: int = 4
    seed: int = 0


@lru_cache(maxsize=64)
def _pool_image(w: int, h: int, slot: int) -> str:
    return media.data_url(media.image_bytes(w, h, seed=slot), "image/jpeg")


@lru_cache(maxsize=8)
def _pool_video(slot: int) -> str:
    w, h, frames, fps = VIDEO
    return media.data_url(media.video_bytes(w, h, frames, fps, seed=slot), "video/mp4")


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def video_part(url: str) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": url}}


class Workload:
    def __init__(self, scenario: str, opts: WorkloadOptions) -> None:
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r}; one of {', '.join(SCENARIOS)}")
        self.scenario, self.opts = scenario, opts

    def body(self, messages: list[dict[str, Any]], max_tokens: int | None = None) -> dict[str, Any]:
        body = {"model": self.opts.model, "messages": messages, "max_tokens": max_tokens or self.opts.max_tokens,
                "temperature": self.opts.temperature, "stream": True, "stream_options": {"include_usage": True}}
        if self.opts.ignore_eos:
            body["ignore_eos"] = True
        return body

    def _image(self, rng: random.Random, w: int, h: int, unique_id: int) -> tuple[str, bool]:
        if rng.random() < self.opts.image_reuse:
            return _pool_image(w, h, rng.randrange(POOL_SIZE)), True
        return media.data_url(media.image_bytes(w, h, seed=0, unique_id=unique_id), "image/jpeg"), False

    def _question(self, rng: random.Random, lo: int = 6, hi: int = 16) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi))) + "?"

    def build(self, index: int) -> PlannedRequest:
        rng = random.Random(self.opts.seed * 1_000_003 + index)
        s = self.scenario
        if s == "text-only":
            msgs = [{"role": "system", "content": _SYSTEM},
                    {"role": "user", "content": self._question(rng, 20, 400)}]
            return PlannedRequest(index, "text", self.body(msgs), (), None)
        if s == "video":
            w, h, frames, fps = VIDEO
            if rng.random() < self.opts.image_reuse:
                url, hit = _pool_video(rng.randrange(POOL_SIZE)), True
            else:
                url, hit = media.data_url(media.video_bytes(w, h, frames, fps, seed=0, unique_id=index), "video/mp4"), False
            content = [video_part(url), {"type": "text", "text": "What happens in this clip?"}]
            return PlannedRequest(index, "video", self.body([{"role": "user", "content": content}]),
                                  (f"video:{w}x{h}x{frames}",), "hit" if hit else "miss")
        if s == "multi-turn":
            return self._turn(index)
        if s == "image-heavy":
            label = rng.choices(("224", "720p", "1080p"), weights=(0.5, 0.3, 0.2))[0]
            sizes, kind = [media.SIZES[label]], f"image:{label}"
        elif s == "multi-image":
            n = rng.randint(2, 4)
            sizes, kind = [media.SIZES["224"]] * n, f"images:{n}"
        else:  # steady, spike, ramp
            sizes, kind = [media.SIZES["224"]], "image:224"
        parts, hits = [], []
        for j, (w, h) in enumerate(sizes):
            url, hit = self._image(rng, w, h, unique_id=index * 8 + j)
            parts.append(image_part(url))
            hits.append(hit)
        parts.append({"type": "text", "text": self._question(rng)})
        cache = "hit" if all(hits) else "miss"
        return PlannedRequest(index, kind, self.body([{"role": "user", "content": parts}]),
                              tuple(f"image:{w}x{h}" for w, h in sizes), cache)

    def _turn(self, index: int) -> PlannedRequest:
        """Turn k of session index // turns: its own image at turn 0, the history after."""
        session, turn = divmod(index, max(self.opts.turns, 1))
        rng = random.Random(self.opts.seed * 7_000_003 + session)
        w, h = media.SIZES["224"]
        url = media.data_url(media.image_bytes(w, h, seed=1, unique_id=10_000_000 + session), "image/jpeg")
        msgs: list[dict[str, Any]] = [{"role": "user", "content": [image_part(url),
                                                                  {"type": "text", "text": self._question(rng)}]}]
        for _ in range(turn):
            msgs.append({"role": "assistant", "content": " ".join(rng.choice(_WORDS) for _ in range(24)) + "."})
            msgs.append({"role": "user", "content": self._question(rng)})
        return PlannedRequest(index, f"turn:{turn}", self.body(msgs), (f"image:{w}x{h}",), "miss" if turn == 0 else "hit")

    def calibration_pair(self, key: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Two bodies that differ by one media item of kind `key`: the difference of their
        usage.prompt_tokens is what the server counts for that item."""
        kind, _, dims = key.partition(":")
        text = {"type": "text", "text": "Describe it."}
        if kind == "video":
            item = video_part(_pool_video(POOL_SIZE))
        else:
            w, h = (int(v) for v in dims.split("x"))
            item = image_part(_pool_image(w, h, POOL_SIZE))
        with_media = self.body([{"role": "user", "content": [item, text]}], max_tokens=1)
        without = self.body([{"role": "user", "content": [text]}], max_tokens=1)
        return with_media, without
