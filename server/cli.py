"""`vlmserve serve | bench | make-tiny-model`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from vlmserve.models.registry import TINY_MAKERS

DEMO_FAMILY = "qwen2_vl"


def demo_model_dir() -> Path:
    """The built-in demo checkpoint, made on first use (a tiny random Qwen2-VL)."""
    base = Path(os.environ.get("VLMSERVE_CACHE", Path.home() / ".cache" / "vlmserve"))
    path = base / "demo-qwen2-vl"
    if not (path / "model.safetensors").exists():
        from vlmserve.models.qwen2_vl.tiny import make_tiny_qwen2_vl

        logging.getLogger("vlmserve").info("making the built-in demo model at %s", path)
        make_tiny_qwen2_vl(path, seed=0)
    return path


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", help="checkpoint directory or hub repo id (default: the built-in tiny demo model)")
    g.add_argument("--config", help="a model_configs/*.yaml file; flags given here override it")
    g.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"])
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--kernel-backend", choices=["auto", "triton", "torch"])
    g.add_argument("--seed", type=int)
    g.add_argument("--block-size", type=int)
    g.add_argument("--num-kv-blocks", type=int, help="KV cache size in blocks (default: from --kv-cache-memory-gb)")
    g.add_argument("--kv-cache-memory-gb", type=float,
                   help="KV cache size in GiB (default: sized by --gpu-memory-utilization on CUDA, 1 GiB elsewhere)")
    g.add_argument("--num-cross-kv-blocks", type=int, help="cross-attention K/V pool (Mllama) in blocks")
    g.add_argument("--gpu-memory-utilization", type=float,
                   help="on CUDA, the fraction of device memory for weights, activations and the KV cache; the "
                        "cache gets what a profiled largest step leaves (default 0.9; --kv-cache-memory-gb overrides)")
    g.add_argument("--tensor-parallel-size", type=int,
                   help="split the language model over N ranks (N processes; NCCL on GPUs, one per rank, gloo on "
                        "CPUs); vision towers run replicated on every rank (default 1)")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false", default=None)
    g.add_argument("--max-model-len", type=int)
    g.add_argument("--max-num-batched-tokens", type=int)
    g.add_argument("--max-num-seqs", type=int)
    g.add_argument("--max-encoder-tokens-per-step", type=int)
    g.add_argument("--encoder-cache-size", type=int)
    g.add_argument("--min-pixels", type=int)
    g.add_argument("--max-pixels", type=int)


ENGINE_FLAGS = (
    "dtype", "device", "kernel_backend", "seed", "block_size", "num_kv_blocks", "kv_cache_memory_gb", "num_cross_kv_blocks",
    "gpu_memory_utilization", "tensor_parallel_size",
    "enable_prefix_caching", "max_model_len", "max_num_batched_tokens", "max_num_seqs",
    "max_encoder_tokens_per_step", "encoder_cache_size", "min_pixels", "max_pixels", "engine_mode",
)  # fmt: skip


SERVER_FLAGS = (
    "host", "port", "served_model_name", "api_key", "max_request_body_bytes", "limit_mm_per_prompt",
    "max_pending_requests", "max_media_memory_gb", "drain_seconds", "target_queue_wait_s", "max_queue_wait_s", "max_waiting_requests",
    "scale_webhook", "scale_webhook_cooldown_s", "scale_webhook_sustain_s", "engine_watchdog_s", "tool_call_format",
)  # fmt: skip
MEDIA_FLAGS = (
    "max_image_pixels", "max_media_bytes", "max_video_bytes", "image_timeout_s", "video_timeout_s",
    "max_redirects", "allowed_media_domains", "allow_private_media_urls", "allowed_local_media_path",
    "video_fps", "max_video_frames", "min_video_frames", "max_video_duration_s", "max_video_frame_pixels", "media_workers",
    "media_cache_bytes",
)  # fmt: skip


def _build_config(args: argparse.Namespace, server_flags: tuple[str, ...] = ()):
    from dataclasses import replace

    from vlmserve.config import build_config

    overrides = {k: getattr(args, k, None) for k in ENGINE_FLAGS + server_flags}
    config = build_config(args.config, model=args.model, **overrides)
    if not config.engine.model:
        config = replace(config, engine=replace(config.engine, model=str(demo_model_dir())))
    return config


def cmd_serve(args: argparse.Namespace) -> None:
    from vlmserve.api.server import run_server

    if args.api_key is None:
        args.api_key = os.environ.get("VLMSERVE_API_KEY")
    config = _build_config(args, SERVER_FLAGS + MEDIA_FLAGS)
    asyncio.run(run_server(config))


def cmd_make_tiny_model(args: argparse.Namespace) -> None:
    from vlmserve.models.registry import make_tiny_model

    if args.format is not None and args.family != "pixtral":
        raise SystemExit("--format applies to --family pixtral only")
    extra = {"format": args.format} if args.format is not None else {}
    out = make_tiny_model(
        args.family, Path(args.out), seed=args.seed, vocab_size=args.vocab_size,
        generation_config=args.generation_config, **extra,
    )
    print(out)


def cmd_bench(args: argparse.Namespace) -> None:
    from vlmserve.bench import run_offline_bench

    config = _build_config(args)
    run_offline_bench(
        config.engine,
        num_requests=args.num_requests,
        image_size=args.image_size,
        images_per_request=args.images_per_request,
        prompt_words=args.prompt_words,
        max_tokens=args.max_tokens,
        seed=args.bench_seed,
        sampling=args.sampling,
    )


def cmd_bench_preprocess(args: argparse.Namespace) -> None:
    from vlmserve.bench_preprocess import run_preprocess_bench

    run_preprocess_bench(num_images=args.num_images, workers=args.workers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmserve", description="Serve vision-language models (OpenAI API).")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a model over the OpenAI-compatible HTTP API")
    _add_engine_args(serve)
    s = serve.add_argument_group("server")
    s.add_argument("--host", help="default 127.0.0.1")
    s.add_argument("--port", type=int, help="default 8000")
    s.add_argument("--served-model-name")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (also $VLMSERVE_API_KEY)")
    s.add_argument("--max-request-body-bytes", type=int)
    s.add_argument("--max-pending-requests", type=int,
                   help="requests in flight (counted from arrival, media fetch included) past which new ones get "
                        "503 + Retry-After (default 4096)")
    s.add_argument("--max-media-memory-gb", type=float,
                   help="GiB of decoded media and pixels that requests in flight may hold; past it, new requests "
                        "with media get 503 + Retry-After before anything is fetched (default: a quarter of the "
                        "machine's memory, or of the container's memory limit)")
    s.add_argument("--drain-seconds", type=float,
                   help="on SIGTERM, serve this long with /ready at 503 before closing the listener (default 0)")
    s.add_argument("--engine-mode", choices=["process", "thread"],
                   help="run the engine step loop in its own process (default) or on a thread of this one")
    a = serve.add_argument_group("autoscaling, admission control and health")
    a.add_argument("--target-queue-wait-s", type=float,
                   help="queue wait that desired_replicas and the scale webhook aim for (default 1)")
    a.add_argument("--max-queue-wait-s", type=float,
                   help="429 + Retry-After when the estimated queue wait exceeds this (default: no limit)")
    a.add_argument("--max-waiting-requests", type=int,
                   help="429 + Retry-After when this many requests already wait (default: no limit)")
    a.add_argument("--scale-webhook", action="append", metavar="URL",
                   help="POST a JSON event here on sustained overload and on recovery (repeatable)")
    a.add_argument("--scale-webhook-cooldown-s", type=float, help="at most one overload event per this (default 30)")
    a.add_argument("--scale-webhook-sustain-s", type=float,
                   help="how long the wait must stay above (or back under) the target (default 3)")
    a.add_argument("--engine-watchdog-s", type=float,
                   help="with requests pending, a step loop silent this long is dead: /health 503 (default 60)")
    s.add_argument("--tool-call-format", choices=["hermes", "mistral", "llama3_json", "grammar_only"],
                   help="tool-call format for tool_choice auto (default: the model family's own)")
    s.add_argument("--limit-mm-per-prompt", help="most media items per request (default image=32,video=2), e.g. image=64")
    m = serve.add_argument_group("media")
    m.add_argument("--max-image-pixels", type=int, help="refuse larger images (checked from the header)")
    m.add_argument("--max-media-bytes", type=int, help="byte cap of one encoded image")
    m.add_argument("--max-video-bytes", type=int, help="byte cap of one encoded video")
    m.add_argument("--image-timeout-s", type=float)
    m.add_argument("--video-timeout-s", type=float)
    m.add_argument("--max-redirects", type=int)
    m.add_argument("--allowed-media-domains", nargs="+", help="only fetch media URLs from these hosts")
    m.add_argument("--allow-private-media-urls", action="store_true", default=None,
                   help="allow media URLs on loopback and private networks (off by default: SSRF)")
    m.add_argument("--allowed-local-media-path", help="serve file:// media from under this directory only")
    m.add_argument("--video-fps", type=float, help="frames sampled per second of video")
    m.add_argument("--max-video-frames", type=int)
    m.add_argument("--min-video-frames", type=int, help="a short clip keeps at least this many frames (default 4)")
    m.add_argument("--max-video-duration-s", type=float)
    m.add_argument("--max-video-frame-pixels", type=int)
    m.add_argument("--media-workers", type=int, help="decode threads")
    m.add_argument("--media-cache-bytes", type=int)
    serve.set_defaults(func=cmd_serve)

    tiny = sub.add_parser("make-tiny-model", help="write a tiny random-weight checkpoint in the HF on-disk format")
    tiny.add_argument("--family", required=True, choices=sorted(TINY_MAKERS))
    tiny.add_argument("--format", choices=["hf", "mistral"], default=None,
                      help="Pixtral only: the Hugging Face layout (default) or Mistral's (params.json, tekken.json)")
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--vocab-size", type=int, default=None,
                      help="embedding / LM-head rows, e.g. 151936 (Qwen2-VL), 131072 (Pixtral), 128256 (Llama 3.2 "
                           "Vision); default: the tiny tokenizer's size. The tokenizer is kept; extra rows are padding")
    tiny.add_argument("--generation-config", choices=["published", "greedy"], default="published",
                      help="generation_config.json: the family's published sampling defaults (default) or ids only")
    tiny.set_defaults(func=cmd_make_tiny_model)

    bench = sub.add_parser("bench", help="offline synthetic image+text throughput benchmark")
    _add_engine_args(bench)
    bench.add_argument("--num-requests", type=int, default=64)
    bench.add_argument("--image-size", default="448x448", help="WxH of the synthetic images")
    bench.add_argument("--images-per-request", type=int, default=1)
    bench.add_argument("--prompt-words", type=int, default=20)
    bench.add_argument("--max-tokens", type=int, default=64)
    bench.add_argument("--bench-seed", type=int, default=0)
    bench.add_argument("--sampling", choices=["greedy", "checkpoint"], default="greedy",
                       help="greedy, or the checkpoint's generation_config defaults (seeded requests)")
    bench.set_defaults(func=cmd_bench)

    pre = sub.add_parser("bench-preprocess", help="Qwen2-VL image preprocessing: ours vs transformers, images/s")
    pre.add_argument("--num-images", type=int, default=8)
    pre.add_argument("--workers", type=int, default=2)
    pre.set_defaults(func=cmd_bench_preprocess)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        pass
    except (ValueError, FileNotFoundError) as e:
        print(f"vlmserve: error: {e}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:
        from vlmserve.engine.core_client import EngineStartupError

        if not isinstance(e, EngineStartupError):
            raise
        print(f"vlmserve: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
