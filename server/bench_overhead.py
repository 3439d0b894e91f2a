"""`python -m vlmserve.bench_overhead`: the host-side cost of one engine step, per running request.

No model: a Scheduler with N decoding requests and W more waiting, the runner's input
building (`build_inputs`) and the sampler on random logits. Prints, per N, the µs of one
step for each part and the µs per running request, so a cost that grows with the queue or
with a Python loop per request shows up as a slope. The model's forward pass is not here
(`vlmserve bench` measures the whole step).
"""

from __future__ import annotations

import argparse
import inspect
import time

import torch

from vlmserve.config import EngineConfig
from vlmserve.engine.outputs import RunnerOutput
from vlmserve.engine.request import Request
from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.engine.scheduler import Scheduler
from vlmserve.multimodal.inputs import MultiModalItem, ProcessedPrompt
from vlmserve.runner.input_batch import CachedRequestState, build_inputs
from vlmserve.runner.sampler import Sampler

PROMPT = 100


def _request(i: int, params: SamplingParams, image: bool) -> Request:
    items = [MultiModalItem("image", f"img{i}", 10, 64, data={})] if image else []
    prompt = ProcessedPrompt(prompt_token_ids=[(7 * i + j) % 1000 + 10 for j in range(PROMPT)], mm_items=items)
    return Request(f"r{i}", prompt, params, eos_token_ids=frozenset({2}))


def _time(fn, repeat: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat * 1e6


def measure(num_running: int, num_waiting: int, vocab: int, params: SamplingParams, repeat: int) -> dict[str, float]:
    config = EngineConfig(max_num_seqs=num_running, max_num_batched_tokens=num_running * PROMPT,
                          block_size=16, encoder_cache_size=1 << 20, max_encoder_tokens_per_step=1 << 20)
    sched = Scheduler(config, num_kv_blocks=(num_running + 8) * 64, max_model_len=4096)
    for i in range(num_running):
        sched.add_request(_request(i, SamplingParams(max_tokens=10**6, ignore_eos=True), image=False))
    out = sched.schedule()  # admits and prefills every running request
    sched.update(out, RunnerOutput(req_ids=list(out.num_scheduled_tokens),
                                   sampled_token_ids={r: [5] for r in out.num_scheduled_tokens}))
    # The waiting queue cannot be admitted (max_num_seqs is reached): it only costs what
    # the step spends on it.
    for i in range(num_waiting):
        sched.add_request(_request(num_running + i, SamplingParams(max_tokens=4), image=True))

    def sched_step() -> None:
        o = sched.schedule()
        sched.update(o, RunnerOutput(req_ids=list(o.num_scheduled_tokens),
                                     sampled_token_ids={r: [5] for r in o.num_scheduled_tokens}))
        sched.get_stats()

    states = {
        r.request_id: CachedRequestState(r.request_id, r.all_token_ids, r.num_prompt_tokens, [], params,
                                         list(range(k * 64, k * 64 + 8)), r.num_tokens - 1)
        for k, r in enumerate(sched.running)
    }
    order = list(states)
    sched_counts = dict.fromkeys(order, 1)
    sampler = Sampler(frozenset({2}))
    logits = torch.randn(num_running, vocab)
    rows = [states[r] for r in order]
    kwargs = {"inplace": True} if "inplace" in inspect.signature(sampler.__call__).parameters else {}

    def sample() -> None:
        tokens, _ = sampler(logits.clone(), rows, **kwargs)
        for st, tok in zip(rows, tokens):  # what the runner does with them
            st.token_ids.append(tok)

    return {
        "scheduler": _time(sched_step, repeat),
        "build_inputs": _time(lambda: build_inputs(order, sched_counts, states, 16, True), repeat),
        "sampler": _time(sample, repeat),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--running", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--waiting", type=int, default=1000, help="requests queued behind the running ones")
    ap.add_argument("--vocab", type=int, default=2048, help="small: the sampler's per-row overhead, not its math")
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args(argv)
    # One thread: this measures per-request host overhead, which intra-op threads only blur
    # (on a shared box their spinning dominated small ops).
    torch.set_num_threads(1)
    cases = {
        "greedy": SamplingParams(temperature=0.0),
        "qwen-published": SamplingParams(temperature=0.1, top_p=0.001, top_k=1, repetition_penalty=1.05),
        "top_k+top_p+pen+seed": SamplingParams(temperature=0.8, top_k=50, top_p=0.9, presence_penalty=0.5,
                                               frequency_penalty=0.3, seed=1),
    }
    print(f"host-side µs per step (and per running request); {args.waiting} waiting; vocab {args.vocab}")
    for name, params in cases.items():
        for n in args.running:
            m = measure(n, args.waiting, args.vocab, params, args.repeat)
            total = sum(m.values())
            parts = "  ".join(f"{k} {v:8.0f} ({v / n:5.1f}/req)" for k, v in m.items())
            print(f"{name:22s} running {n:4d}: {parts}  total {total:8.0f} ({total / n:5.1f}/req)")


if __name__ == "__main__":
    main()
