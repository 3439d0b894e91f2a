"""LLM: the synchronous, offline API over the same EngineCore (tests and `vlmserve bench`).

All prompts given to one `generate` call are queued at once and run to completion through
the continuous-batching step loop.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from vlmserve.config import EngineConfig
from vlmserve.engine.builder import build_engine
from vlmserve.engine.detokenizer import IncrementalDetokenizer, text_token_ids
from vlmserve.engine.request import Request
from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.multimodal.inputs import ProcessedPrompt


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None


class LLM:
    def __init__(self, config: EngineConfig) -> None:
        parts = build_engine(config)
        self.config = config
        self.core = parts.core
        self.processor = parts.processor
        self.tokenizer = parts.processor.tokenizer
        self.max_model_len = parts.max_model_len
        self.eos_token_ids = frozenset(parts.processor.eos_token_ids)
        self._ids = itertools.count()

    @property
    def runner(self):
        return self.core.runner

    @property
    def scheduler(self):
        return self.core.scheduler

    def render_chat(
        self,
        conversation: list[dict[str, Any]],
        images: list[Image.Image] = (),
        add_generation_prompt: bool = True,
    ) -> ProcessedPrompt:
        return self.processor.render_chat(conversation, list(images), add_generation_prompt, None)

    def generate(
        self, prompts: list[ProcessedPrompt], params: SamplingParams | list[SamplingParams]
    ) -> list[Completion]:
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        results: dict[str, Completion] = {}
        detoks: dict[str, IncrementalDetokenizer] = {}
        order = []
        for prompt, p in zip(prompts, params_list):
            req_id = f"llm-{next(self._ids)}"
            order.append(req_id)
            results[req_id] = Completion(req_id, list(prompt.prompt_token_ids), arrival_time=time.perf_counter())
            detoks[req_id] = IncrementalDetokenizer(
                self.tokenizer, prompt.prompt_token_ids, p, getattr(self.processor, "strips_output_whitespace", False)
            )
            self.core.add_request(Request(req_id, prompt, p, eos_token_ids=self.eos_token_ids))

        while self.core.has_unfinished_requests():
            for out in self.core.step():
                c = results.get(out.req_id)
                if c is None or c.finish_reason is not None:
                    continue
                now = time.perf_counter()
                if c.first_token_time is None:
                    c.first_token_time = now
                    c.num_cached_tokens = out.num_cached_tokens
                c.token_ids.extend(out.new_token_ids)
                text, stop = detoks[out.req_id].update(text_token_ids(out))
                c.text += text
                if stop is not None:
                    c.finish_reason, c.finish_time = "stop", now
                    if out.finish_reason is None:
                        self.core.abort_requests([out.req_id])
                elif out.finish_reason is not None:
                    c.text += detoks[out.req_id].flush()
                    c.finish_reason, c.finish_time = out.finish_reason, now
        return [results[r] for r in order]
