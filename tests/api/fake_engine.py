"""A fake `EngineClient` for API tests: no model, a real tokenizer, real detokenization.

Every request "generates" the token ids of `response_text` followed by EOS, a few tokens per
step. Text deltas come from `IncrementalDetokenizer`, so stop strings, held-back text and
split multi-byte characters go through the same code as in the real engine. Finish
reasons follow the engine's rules: a stop string or EOS (unless `ignore_eos`) → "stop",
`max_tokens` reached → "length".

It records what the API layer sent (`chat_calls`, `completion_prompts`, `params`,
`prompts`, `request_ids`) and which requests were aborted (`aborted`: the stream was
closed before it finished, which is how the real engine learns a client left).
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from PIL import Image

from vlmserve.engine.client import EngineDeadError
from vlmserve.engine.detokenizer import IncrementalDetokenizer
from vlmserve.engine.outputs import RequestOutput, TokenLogprob
from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.multimodal.inputs import ProcessedPrompt

IMAGE_TOKENS = 4  # placeholder tokens per image in the fake prompt


class FakeEngine:
    def __init__(
        self,
        tokenizer: Any,
        *,
        model_name: str = "tiny-vlm",
        max_model_len: int = 512,
        response_text: str = "Hello w\u00f6rld! \u4f60\u597d \U0001f642 The end.",
        tokens_per_step: int = 1,
        defaults: dict[str, Any] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.response_text = response_text
        self.tokens_per_step = tokens_per_step
        self.defaults = defaults or {}
        self.healthy = True
        # Test knobs.
        self.render_error: Exception | None = None
        self.fail_after_steps: int | None = None  # raise RuntimeError at this step
        self.dead_after_steps: int | None = None  # raise EngineDeadError at this step (engine gone)
        self.abort_after_steps: int | None = None  # finish with reason "abort" at this step
        self.error_after_steps: int | None = None  # finish with reason "error" (a failed engine step)
        self.block_after_steps: int | None = None  # wait for `release` at this step
        self.release = asyncio.Event()
        self.reached_block = asyncio.Event()
        # Records.
        self.chat_calls: list[dict[str, Any]] = []
        self.completion_prompts: list[str | list[int]] = []
        self.params: list[SamplingParams] = []
        self.prompts: list[ProcessedPrompt] = []
        self.request_ids: list[str] = []
        self.aborted: list[str] = []
        self.finished: list[str] = []

    @property
    def last_params(self) -> SamplingParams:
        return self.params[-1]

    def generation_defaults(self) -> dict[str, Any]:
        return dict(self.defaults)

    def is_healthy(self) -> bool:
        return self.healthy

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    async def render_chat(
        self,
        conversation: list[dict[str, Any]],
        images: list[Image.Image],
        *,
        videos: list[Any] | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> ProcessedPrompt:
        self.chat_calls.append(dict(conversation=conversation, images=images, videos=videos,
                                    add_generation_prompt=add_generation_prompt,
                                    chat_template_kwargs=chat_template_kwargs))
        if self.render_error is not None:
            raise self.render_error
        pad = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        ids: list[int] = []
        num_image_parts = 0
        for msg in conversation:
            ids += self._encode(f"{msg['role']}: ")
            parts = msg["content"] if isinstance(msg["content"], list) else [{"type": "text", "text": msg["content"]}]
            for part in parts:
                if part["type"] == "image":
                    ids += [pad] * IMAGE_TOKENS
                    num_image_parts += 1
                elif part["type"] == "video":
                    ids += [pad] * IMAGE_TOKENS
                else:
                    ids += self._encode(part["text"])
            ids.append(self.tokenizer.convert_tokens_to_ids("<|im_end|>"))
        if num_image_parts != len(images):
            raise AssertionError(f"{num_image_parts} image parts but {len(images)} images")
        if add_generation_prompt:
            ids += self._encode("assistant: ")
        return ProcessedPrompt(prompt_token_ids=ids)

    async def render_completion(self, prompt: str | list[int]) -> ProcessedPrompt:
        self.completion_prompts.append(prompt)
        if self.render_error is not None:
            raise self.render_error
        ids = list(prompt) if isinstance(prompt, list) else self._encode(prompt)
        return ProcessedPrompt(prompt_token_ids=ids)

    async def generate(
        self, prompt: ProcessedPrompt, sampling_params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        self.params.append(sampling_params)
        self.prompts.append(prompt)
        self.request_ids.append(request_id)
        p = sampling_params
        eos = self.tokenizer.eos_token_id
        script = self._encode(self.response_text) + [eos]
        detok = IncrementalDetokenizer(self.tokenizer, prompt.prompt_token_ids, p)
        num_out = 0
        done = False
        step = 0
        try:
            while not done:
                step += 1
                await asyncio.sleep(0)  # other requests (and disconnect checks) run between steps
                if step == self.fail_after_steps:
                    raise RuntimeError("simulated engine fault: CUDA error at /secret/path.py:42")
                if step == self.dead_after_steps:
                    self.healthy = False
                    raise EngineDeadError("the engine pipe writer failed: PicklingError('/secret/x')")
                if step == self.block_after_steps:
                    self.reached_block.set()
                    await self.release.wait()
                if step == self.abort_after_steps:
                    done = True
                    yield self._output(request_id, prompt, "", [], "abort", None, num_out)
                    return
                if step == self.error_after_steps:
                    done = True
                    yield self._output(request_id, prompt, "", [], "error", None, num_out)
                    return
                new: list[int] = []
                finish, stop_reason = None, None
                for _ in range(self.tokens_per_step):
                    token = script[num_out % len(script)] if p.ignore_eos else script[min(num_out, len(script) - 1)]
                    new.append(token)
                    num_out += 1
                    if token == eos and not p.ignore_eos and num_out > p.min_tokens:
                        finish, stop_reason = "stop", eos
                        break
                    if num_out >= p.max_tokens:
                        finish = "length"
                        break
                # The real engine does not hand EOS to the detokenizer's stop-string check
                # any differently: with skip_special_tokens it adds no text.
                text, stop_str = detok.update(new)
                if stop_str is not None:
                    finish, stop_reason = "stop", stop_str
                elif finish is not None:
                    text += detok.flush()
                logprobs = None
                if p.logprobs is not None:
                    # The sampled token first, then two alternatives (the last at -inf).
                    top = [(0, -0.25), (1, -1.5), (2, float("-inf"))][: p.logprobs]
                    logprobs = [TokenLogprob(t, -0.25, [(t + d, lp) for d, lp in top]) for t in new]
                done = finish is not None
                yield self._output(request_id, prompt, text, new, finish, stop_reason, num_out, logprobs)
            self.finished.append(request_id)
        finally:
            if not done:
                self.aborted.append(request_id)

    def _output(self, request_id: str, prompt: ProcessedPrompt, text: str, new: list[int], finish: str | None,
                stop_reason: int | str | None, num_out: int, logprobs: list[TokenLogprob] | None = None
                ) -> RequestOutput:
        return RequestOutput(
            request_id=request_id, text=text, token_ids=new, finished=finish is not None, finish_reason=finish,
            stop_reason=stop_reason, num_prompt_tokens=len(prompt.prompt_token_ids), num_output_tokens=num_out,
            num_cached_tokens=0, logprobs=logprobs,
        )

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
