"""Admission from arrival: the in-flight request count (`--max-pending-requests`) and the media
memory budget (`--max-media-memory-gb`), both held by a request from the moment its body is
parsed until its response ends (finished, failed, aborted, client gone).

    ticket = intake.admit(n, refs)        # 503 + Retry-After (or 413) before any fetch
    with ticket:                          # released on the way out, unless handed on:
        images = await load_media(refs, loader, ticket.hold)
        ticket.media_loaded()             # the raw bytes are gone
        prompt = await render(...)
        ticket.rendered(prompt)           # from here: the pixels the request ships
        return SSEResponse(..., on_close=ticket.detach())   # a stream releases when it closes

What a request holds, in bytes (see `vlmserve.multimodal.budget` for reserve vs settle):
- the text of its data: URLs, in the parsed body until the response ends ("body");
- per media item, from arrival: what its raw bytes may take: a data: URL's decoded payload
  size (exact), the byte cap of its kind for a URL (`--max-media-bytes`, `--max-video-bytes`).
  When a request's caps together exceed the whole budget, its URL items' shares are scaled
  down to fit it (admitted once the budget is free enough; retrying can help, so no 413).
  The fetch then reserves the real size (Content-Length) under the same key, usually a
  shrink; then the decoded image or frames (reserved from the header before decoding);
- after rendering: the pixel arrays of its `MultiModalItem`s, counted once in this process
  and once per engine request in the engine core's process (n of them; its own copies come
  through the pipe), until the response ends. That is later than the engine frees them
  (at the request's end, or earlier): an upper bound, never an undercount.

Requests without media never touch the budget, so text keeps flowing while it is full.
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from vlmserve.api.errors import APIError
from vlmserve.multimodal.budget import GiB, MediaBudget, MediaHold, MediaMemoryExceeded
from vlmserve.multimodal.inputs import ProcessedPrompt

RETRY_AFTER_S = "1"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def media_memory_error(e: MediaMemoryExceeded) -> APIError:
    """503 + Retry-After while the budget is full; 413 when this request alone is larger."""
    setting = e.setting or f"--max-media-memory-gb {e.limit / GiB:g}"
    if e.never_fits:
        return APIError(
            f"this request's media need more than the server's whole media memory budget ({_mib(e.limit)}, "
            f"{setting}); send fewer or smaller images, or raise --max-media-memory-gb",
            413, param="messages", code="media_memory_exceeded",
        )
    return APIError(
        f"the server's media memory budget is full ({_mib(e.held)} of {_mib(e.limit)} held by requests in "
        f"flight, {setting}); retry after a short wait",
        503, code="media_memory_full", type="server_error", headers={"Retry-After": RETRY_AFTER_S},
    )


def _nbytes(value: Any) -> int:
    """Bytes of a tensor / array in an item's data (numpy and torch both have `nbytes`)."""
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    n = getattr(value, "nbytes", None)
    return int(n) if isinstance(n, int) else 0


def prompt_media_nbytes(prompt: ProcessedPrompt) -> int:
    return sum(_nbytes(item.data) for item in prompt.mm_items)


class Ticket:
    """One request's admission: its weight in the in-flight count and its `MediaHold`."""

    def __init__(self, intake: Intake, weight: int, hold: MediaHold, copies: int) -> None:
        self._intake = intake
        self.weight = weight
        self.hold = hold
        self._copies = copies  # how many times the rendered pixels exist (both processes)
        self._keys: list[str] = []
        self._released = False
        self._detached = False

    def track(self, key: str) -> None:
        self._keys.append(key)

    def media_loaded(self) -> None:
        for key in self._keys:
            self.hold.settle(f"{key}:raw", 0)

    def rendered(self, prompt: ProcessedPrompt) -> None:
        """The decoded media are dropped by the caller; the rendered pixels are what is held."""
        self.hold.settle("pixels", prompt_media_nbytes(prompt) * self._copies)
        for key in self._keys:
            self.hold.settle(f"{key}:decoded", 0)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.hold.release()
            self._intake._in_flight -= self.weight

    def detach(self) -> Callable[[], None]:
        """Hands the release on (to a streaming response): leaving the `with` no longer releases."""
        self._detached = True
        return self.release

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._detached:
            self.release()


class Intake:
    def __init__(self, max_pending: int, budget: MediaBudget, byte_caps: dict[str, int], *,
                 separate_core_process: bool = False, model_name: str = "") -> None:
        """`byte_caps`: the raw byte cap of one item per kind ("image", "video")."""
        self.max_pending = max_pending
        self.budget = budget
        self.byte_caps = byte_caps
        self.separate_core_process = separate_core_process
        self.model_name = model_name
        self._in_flight = 0
        self.registry = CollectorRegistry()
        self.registry.register(_IntakeCollector(self))

    @property
    def in_flight(self) -> int:
        """Engine requests (n per API request) of the requests between arrival and response end."""
        return self._in_flight

    def admit(self, weight: int, media: list[tuple[str, str]]) -> Ticket:
        """Raises APIError before anything is fetched: 503 past `--max-pending-requests` or with
        the media memory budget full, 413 for media that can never fit. `media`: (kind, url)
        in prompt order; the i-th is loaded under the hold key str(i)."""
        if self._in_flight >= self.max_pending:
            raise APIError(
                f"the server is at capacity ({self._in_flight} requests in flight, --max-pending-requests "
                f"{self.max_pending}); retry after a short wait",
                503, code="overloaded", type="server_error", headers={"Retry-After": RETRY_AFTER_S},
            )
        copies = 1 + (weight if self.separate_core_process else 0)
        ticket = Ticket(self, weight, self.budget.hold(), copies)
        try:
            ticket.hold.reserve("body", sum(len(url) for _, url in media if _data_url_bytes(url) is not None))
            for i, share in enumerate(self._arrival_shares(media)):
                ticket.track(str(i))
                ticket.hold.reserve(f"{i}:raw", share)
        except MediaMemoryExceeded as e:
            ticket.hold.release()
            raise media_memory_error(e) from None
        self._in_flight += weight
        return ticket

    def _arrival_shares(self, media: list[tuple[str, str]]) -> list[int]:
        exact = [_data_url_bytes(url) for _, url in media]
        caps = [self.byte_caps.get(kind, 1) if n is None else 0 for (kind, _), n in zip(media, exact)]
        text = sum(len(url) for (_, url), n in zip(media, exact) if n is not None)
        room = self.budget.limit - text - sum(n or 0 for n in exact)
        scale = min(1.0, max(room, 0) / sum(caps)) if sum(caps) else 1.0
        return [max(1, n if n is not None else int(cap * scale)) for n, cap in zip(exact, caps)]

    def snapshot(self) -> dict[str, float]:
        return {
            "num_requests_in_flight": self._in_flight,
            "media_memory_bytes": self.budget.held,
            "media_memory_limit_bytes": self.budget.limit,
        }


def _data_url_bytes(url: str) -> int | None:
    """A data: URL's decoded size (3 bytes per 4 of base64, what its fetch reserves); None for
    a URL that is fetched."""
    if url[:5].lower() != "data:":
        return None
    comma = url.find(",")
    return max(1, (len(url) - comma - 1) // 4 * 3) if comma > 0 else 1


class _IntakeCollector:
    def __init__(self, intake: Intake) -> None:
        self.intake = intake

    def collect(self):
        s = self.intake.snapshot()
        for name, doc, key in (
            ("vlmserve:media_memory_bytes", "Bytes of media and pixels held by requests in flight.",
             "media_memory_bytes"),
            ("vlmserve:media_memory_limit_bytes", "The media memory budget (--max-media-memory-gb).",
             "media_memory_limit_bytes"),
            ("vlmserve:api_requests_in_flight",
             "Engine requests of API requests from arrival to response end (--max-pending-requests).",
             "num_requests_in_flight"),
        ):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([self.intake.model_name], s[key])
            yield g
