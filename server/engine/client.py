"""EngineClient: what the API layer may call on the engine (implemented by
`server/engine/async_engine.py::AsyncEngine`, faked in API tests).

The API layer turns an OpenAI request into an HF-style conversation plus decoded media,
asks the engine to render it into a `ProcessedPrompt` (chat template, tokenizer, image
processor: CPU work, run off the event loop), then streams `RequestOutput`s.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Protocol

from PIL import Image

from vlmserve.engine.outputs import RequestOutput
from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.multimodal.inputs import ProcessedPrompt


class RequestRejected(ValueError):
    """The engine refused a request it can never serve under this deployment's limits (an
    image larger than the encoder budget, a prompt larger than the KV cache, ...). The
    message names the limit and the flag that raises it; the API answers 400."""


class EngineDeadError(RuntimeError):
    """The engine stopped (its loop failed, its process died, or the pipe to it broke): every
    request in flight ends with this, ``/health`` reports 503, and the server must be
    restarted. The message is for the log; the API answers a fixed 500 `engine_error`."""


class EngineClient(Protocol):
    model_name: str  # the served model name (what /v1/models lists)
    max_model_len: int
    # The model's transformers tokenizer: the API renders logprob tokens with it (read-only).
    tokenizer: Any

    # The media kinds the model takes, e.g. ("image", "video"); others are refused with a 400
    # before they are fetched. Optional: without it both are accepted.
    modalities: tuple[str, ...]

    def generation_defaults(self) -> dict[str, Any]:
        """Sampling defaults from the checkpoint's generation_config.json (keys named as in
        SamplingParams: temperature, top_p, top_k, repetition_penalty, ...). A request's own
        values win; `temperature: 0` in a request means greedy."""

    async def render_chat(
        self,
        conversation: list[dict[str, Any]],
        images: list[Image.Image],
        *,
        videos: list[Any] | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> ProcessedPrompt:
        """`conversation` is HF-style: [{"role", "content": str | [{"type": "text", "text"} |
        {"type": "image"} | {"type": "video"}]}]; `images` are RGB, in the order of the image
        parts; `videos` (`vlmserve.multimodal.video.VideoFrames`: uint8 frames [N, H, W, 3] and
        their sampled fps) in the order of the video parts. Raises ValueError with a
        user-facing message on bad input (too long, too many images)."""

    async def render_completion(self, prompt: str | list[int]) -> ProcessedPrompt: ...

    def generate(
        self, prompt: ProcessedPrompt, sampling_params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Streams one RequestOutput per step the request advanced; the last has
        finished=True. Closing the iterator early (client gone) aborts the request and frees
        its blocks."""

    async def abort(self, request_id: str) -> None: ...

    def is_healthy(self) -> bool: ...
