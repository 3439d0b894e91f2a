"""`python -m vlmserve.kernels.bench [--small] [--ops a,b]`: check every Triton kernel against its
PyTorch reference and, on CUDA, time both against the op's roofline.

On CUDA (default sizes are Qwen2-VL-7B's: 28 q / 4 kv heads × 128, hidden 3584,
intermediate 18944; vision 16 heads × 80; 1–4 images of 1024×768, smart-resized to
1008×756; decode batches 1–256, contexts to 8k) each case is compiled, checked and timed
with CUDA events. Roofline = max(bytes moved / HBM bandwidth, FLOPs / peak dense bf16).
Without CUDA, or with --small, only the correctness part runs at small sizes (under
Triton's interpreter on the CPU). `run_checks("tiny")` is the CI entry point.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch

# The interpreter must be chosen before triton's first import (the kernel modules import it).
if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("vlmserve.kernels.bench: triton was imported before TRITON_INTERPRET=1 could be set")
    os.environ["TRITON_INTERPRET"] = "1"

from vlmserve.kernels import reference  # noqa: E402
from vlmserve.kernels.cross_attention import cross_attention  # noqa: E402
from vlmserve.kernels.merge_embeddings import merge_embeddings  # noqa: E402
from vlmserve.kernels.normalize_patchify import normalize_patchify  # noqa: E402
from vlmserve.kernels.paged_attention import paged_attention  # noqa: E402
from vlmserve.kernels.rms_norm import rms_norm  # noqa: E402
from vlmserve.kernels.rotary import rotary  # noqa: E402
from vlmserve.kernels.silu_and_mul import silu_and_mul  # noqa: E402
from vlmserve.kernels.varlen_attention import varlen_attention  # noqa: E402
from vlmserve.kernels.write_kv import write_kv  # noqa: E402

# (HBM bytes/s, dense bf16 FLOP/s) by a substring of the device name; H100 SXM by default.
PEAKS = {"H200": (4.8e12, 989e12), "H100": (3.35e12, 989e12), "A100": (2.0e12, 312e12),
         "L40S": (0.864e12, 362e12), "L4": (0.3e12, 121e12), "A10": (0.6e12, 125e12)}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@dataclass
class Case:
    op: str
    name: str
    triton: Callable[[], object]  # runs the kernel, returns what to compare
    ref: Callable[[], object]  # the same through the reference
    bytes: int
    flops: int = 0
    tol: float = 0.0


def _flat(x) -> list[torch.Tensor]:
    return [t for t in (x if isinstance(x, (tuple, list)) else (x,))]


def _rms_cases(dev, dt, sz):
    rows, h = {"tiny": (5, 64), "small": (33, 512), "full": (4096, 3584)}[sz]
    x, r = torch.randn(rows, h, device=dev, dtype=dt), torch.randn(rows, h, device=dev, dtype=dt)
    w = torch.rand(h, device=dev, dtype=dt) + 0.5
    es = x.element_size()
    return [Case("rms_norm", f"{rows}x{h}+residual", lambda: rms_norm(x, w, 1e-6, r),
                 lambda: reference.rms_norm(x, w, 1e-6, r), 4 * rows * h * es + h * es)]


def _silu_cases(dev, dt, sz):
    rows, inter = {"tiny": (3, 64), "small": (17, 600), "full": (4096, 18944)}[sz]
    x = torch.randn(rows, 2 * inter, device=dev, dtype=dt)
    return [Case("silu_and_mul", f"{rows}x{inter}", lambda: silu_and_mul(x), lambda: reference.silu_and_mul(x),
                 3 * rows * inter * x.element_size())]


def _rotary_cases(dev, dt, sz):
    shapes = {"tiny": [(3, 4, 1, 80)], "small": [(9, 8, 2, 128), (11, 4, 4, 80)],
              "full": [(4096, 28, 4, 128), (15552, 16, 16, 80)]}[sz]
    cases = []
    for t, hq, hk, d in shapes:
        q, k = torch.randn(t, hq, d, device=dev, dtype=dt), torch.randn(t, hk, d, device=dev, dtype=dt)
        ang = torch.rand(t, d // 2, device=dev) * 100
        cos, sin = ang.cos(), ang.sin()
        qa, ka, qb, kb = q.clone(), k.clone(), q.clone(), k.clone()
        cases.append(Case("rotary", f"T{t} {hq}/{hk}x{d}",
                          lambda qa=qa, ka=ka, cos=cos, sin=sin: (rotary(qa, ka, cos, sin), qa, ka)[1:],
                          lambda qb=qb, kb=kb, cos=cos, sin=sin: (reference.rotary(qb, kb, cos, sin), qb, kb)[1:],
                          2 * t * (hq + hk) * d * q.element_size() + 2 * t * d * 2))
    return cases


def _varlen_cases(dev, dt, sz):
    # (sequence lengths, heads q/kv, head dim, causal); 3888 = one 1008×756 image at patch 14.
    shapes = {"tiny": [([5, 1, 9], 2, 2, 80, False)],
              "small": [([17, 1, 30], 4, 1, 128, True), ([24, 8], 4, 4, 80, False)],
              "full": [([3888], 16, 16, 80, False), ([3888] * 4, 16, 16, 80, False),
                       ([2048, 1024, 512], 28, 4, 128, True)]}[sz]
    cases = []
    for lens, hq, hk, d, causal in shapes:
        t = sum(lens)
        q = torch.randn(t, hq, d, device=dev, dtype=dt)
        k, v = torch.randn(t, hk, d, device=dev, dtype=dt), torch.randn(t, hk, d, device=dev, dtype=dt)
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
        args = (q, k, v, cu, max(lens), causal, d ** -0.5)
        pairs = sum(n * n for n in lens) * (0.5 if causal else 1.0)
        cases.append(Case("varlen_attention", f"{len(lens)} seq max {max(lens)} {hq}/{hk}x{d}{' causal' if causal else ''}",
                          lambda a=args: varlen_attention(*a), lambda a=args: reference.varlen_attention(*a),
                          2 * t * (hq + hk) * d * q.element_size(), int(4 * pairs * hq * d)))
    return cases


def _paged_inputs(dev, dt, seq_lens, q_lens, hq, hk, d, bs):
    nblk = [(s + bs - 1) // bs for s in seq_lens]
    pool = sum(nblk) + 8
    perm = torch.randperm(pool)[: sum(nblk)]
    table = torch.zeros(len(seq_lens), max(nblk), dtype=torch.int32)
    at = 0
    for i, n in enumerate(nblk):
        table[i, :n], at = perm[at:at + n], at + n
    kc = torch.randn(pool, bs, hk, d, device=dev, dtype=dt)
    vc = torch.randn(pool, bs, hk, d, device=dev, dtype=dt)
    q = torch.randn(sum(q_lens), hq, d, device=dev, dtype=dt)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
    return (q, kc, vc, table.to(dev), sl, qsl, max(q_lens), max(seq_lens), d ** -0.5)


def _paged_cases(dev, dt, sz):
    # (name, seq_lens, query lens, num_splits override)
    shapes = {"tiny": [("mixed", [9, 1, 20], [9, 1, 1], None), ("split", [40], [1], 2)],
              "small": [("mixed", [30, 7, 50, 1], [4, 7, 1, 1], None), ("split", [70, 33], [1, 2], 3)],
              "full": [("decode B1 8k", [8192], [1], None), ("decode B32 4k", [4096] * 32, [1] * 32, None),
                       ("decode B256 2k", [2048] * 256, [1] * 256, None),
                       ("mixed 2x2k chunk+64 dec", [4096, 4096] + [3000] * 64, [2048, 2048] + [1] * 64, None)]}[sz]
    cases = []
    for name, sls, qls, splits in shapes:
        args = _paged_inputs(dev, dt, sls, qls, 28 if sz == "full" else 4, 4 if sz == "full" else 1,
                             128 if sz == "full" else 64, 16)
        q, kc = args[0], args[1]
        kv_bytes = sum(sls) * kc.shape[2] * kc.shape[3] * kc.element_size() * 2
        flops = 4 * sum(ql * s for ql, s in zip(qls, sls)) * q.shape[1] * q.shape[2]
        cases.append(Case("paged_attention", name,
                          lambda a=args, s=splits: paged_attention(*a, num_splits=s),
                          lambda a=args: reference.paged_attention(*a),
                          kv_bytes + 2 * q.numel() * q.element_size(), flops))
    return cases


def _write_kv_cases(dev, dt, sz):
    t, hk, d, bs = {"tiny": (5, 1, 80, 4), "small": (20, 2, 128, 8), "full": (4096, 4, 128, 16)}[sz]
    k, v = torch.randn(t, hk, d, device=dev, dtype=dt), torch.randn(t, hk, d, device=dev, dtype=dt)
    nb = t // bs + 4
    slots = torch.randperm(nb * bs, device=dev)[:t]
    ca = [torch.randn(nb, bs, hk, d, device=dev, dtype=dt) for _ in range(2)]
    cb = [c.clone() for c in ca]
    return [Case("write_kv", f"T{t} {hk}x{d}", lambda: (write_kv(k, v, *ca, slots), *ca)[1:],
                 lambda: (reference.write_kv(k, v, *cb, slots), *cb)[1:], 4 * t * hk * d * k.element_size())]


def _merge_cases(dev, dt, sz):
    t, h, m = {"tiny": (9, 64, 4), "small": (40, 256, 17), "full": (8192, 3584, 3888)}[sz]
    mm = torch.randn(m, h, device=dev, dtype=dt)
    pos = torch.randperm(t, device=dev)[:m]
    ea = torch.randn(t, h, device=dev, dtype=dt)
    eb = ea.clone()
    return [Case("merge_embeddings", f"{m} of {t}x{h}", lambda: (merge_embeddings(ea, mm, pos), ea)[1],
                 lambda: (reference.merge_embeddings(eb, mm, pos), eb)[1], 2 * m * h * mm.element_size())]


def _patchify_cases(dev, dt, sz):
    h, w, n_img = {"tiny": (28, 56, 1), "small": (56, 84, 2), "full": (1008, 756, 4)}[sz]
    imgs = [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, device=dev) for _ in range(n_img)]
    args = (reference.normalize_lut(CLIP_MEAN, CLIP_STD).to(dev), 14, 2, 2, "qwen2_vl", dt)
    out_bytes = n_img * (h // 14) * (w // 14) * 3 * 2 * 196 * torch.empty(0, dtype=dt).element_size()
    return [Case("normalize_patchify", f"{n_img}x {h}x{w} qwen2_vl",
                 lambda: [normalize_patchify(i, *args) for i in imgs],
                 lambda: [reference.normalize_patchify(i, *args) for i in imgs],
                 n_img * h * w * 3 + out_bytes)]


def _image_ranges(q_len: int, seq_len: int, n_images: int) -> list[list[int]]:
    """Mllama-like ranges: the first eighth of the tokens before any image (empty: all rows),
    the rest split over the images, each attending to its image's rows."""
    if seq_len == 0:
        return [[0, 0]] * q_len
    pre, per = q_len // 8, seq_len // n_images
    out = [[0, 0]] * pre
    for j in range(q_len - pre):
        i = min(n_images - 1, j * n_images // (q_len - pre))
        out.append([i * per, seq_len if i == n_images - 1 else (i + 1) * per])
    return out


def _cross_cases(dev, dt, sz):
    # Decoder cross layers, Llama-3.2-11B-Vision's sizes at "full": 32 q / 8 kv heads × 128,
    # 6404 rows per image (4 tiles × 1601). (name, seq_lens, query lens, images per request,
    # heads q/kv, head dim); then the vision tower's padding-mask attention, one block per image.
    shapes = {"tiny": [("mixed", [9, 0, 20], [3, 2, 5], 2, 2, 1, 64)],
              "small": [("mixed", [30, 0, 50], [9, 2, 17], 2, 4, 1, 64), ("decode", [40, 33], [1, 1], 1, 4, 2, 128)],
              "full": [("prefill 2k 1 img", [6404], [2048], 1, 32, 8, 128),
                       ("prefill 2x1k 2 img", [12808, 12808], [1024, 1024], 2, 32, 8, 128),
                       ("decode B64 1 img", [6404] * 64, [1] * 64, 1, 32, 8, 128)]}[sz]
    cases = []
    for name, sls, qls, n_img, hq, hk, d in shapes:
        q, kc, vc, bt, sl, qsl, _, _, scale = _paged_inputs(dev, dt, sls, qls, hq, hk, d, 16)
        rg = [r for s, ql in zip(sls, qls) for r in _image_ranges(ql, s, n_img)]
        args = (q, kc, vc, bt, sl, torch.tensor(rg, dtype=torch.int32, device=dev), qsl, scale)
        attended = sum((hi - lo) or s for s, ql in zip(sls, qls) for lo, hi in _image_ranges(ql, s, n_img))
        cases.append(Case("cross_attention", f"{name} {hq}/{hk}x{d}",
                          lambda a=args: cross_attention(*a), lambda a=args: reference.cross_attention(*a),
                          sum(sls) * 2 * hk * d * kc.element_size() + 2 * q.numel() * q.element_size(),
                          4 * attended * hq * d))
    # Vision tower: tokens per image L (tiles × padded patches), real tokens R attend to all
    # L, padding tokens to the R real ones.
    n_img, length, real, heads, d = {"tiny": (1, 24, 17, 2, 80), "small": (2, 48, 34, 2, 80),
                                     "full": (4, 4 * 1608, 2 * 1601, 16, 80)}[sz]
    q = torch.randn(n_img * length, heads, d, device=dev, dtype=dt)
    kv = torch.randn(2, n_img, length, heads, d, device=dev, dtype=dt)
    end = torch.where(torch.arange(length, device=dev) < real, length, real).repeat(n_img)
    rg = torch.stack([torch.zeros_like(end), end], dim=-1).to(torch.int32)
    args = (q, kv[0], kv[1], torch.arange(n_img, dtype=torch.int32, device=dev).unsqueeze(1),
            torch.full((n_img,), length, dtype=torch.int32, device=dev), rg,
            torch.arange(0, (n_img + 1) * length, length, dtype=torch.int32, device=dev), d ** -0.5)
    cases.append(Case("cross_attention", f"vision {n_img} img L{length} {heads}x{d}",
                      lambda a=args: cross_attention(*a), lambda a=args: reference.cross_attention(*a),
                      4 * q.numel() * q.element_size(), 4 * int(end.sum()) * heads * d))
    return cases


CASE_BUILDERS = {"rms_norm": _rms_cases, "silu_and_mul": _silu_cases, "rotary": _rotary_cases,
                 "varlen_attention": _varlen_cases, "paged_attention": _paged_cases, "write_kv": _write_kv_cases,
                 "merge_embeddings": _merge_cases, "normalize_patchify": _patchify_cases,
                 "cross_attention": _cross_cases}


def _max_error(got, want) -> float:
    worst = 0.0
    for g, w in zip(_flat(got), _flat(want), strict=True):
        if g.shape != w.shape:
            return float("inf")
        diff = (g.float() - w.float()).abs() / (1.0 + w.float().abs())
        worst = max(worst, float("inf") if diff.isnan().any() else diff.max().item())
    return worst


def build_cases(size: str, device: torch.device, dtypes, ops=None) -> list[Case]:
    cases = []
    for dt in dtypes:
        for op, builder in CASE_BUILDERS.items():
            if ops is None or op in ops:
                for case in builder(device, dt, size):
                    case.name, case.tol = f"{case.name} {str(dt).removeprefix('torch.')}", TOL[dt]
                    cases.append(case)
    return cases


def run_checks(size: str = "tiny", ops=None, dtypes=(torch.bfloat16,)) -> list[tuple[Case, float, bool]]:
    """Correctness only: (case, max relative error, passed) for every case."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    results = []
    for case in build_cases(size, device, dtypes, ops):
        err = _max_error(case.triton(), case.ref())
        results.append((case, err, err <= case.tol))
    return results


def _time_ms(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="correctness only, at small sizes")
    ap.add_argument("--ops", default=None, help=f"comma-separated subset of {','.join(CASE_BUILDERS)}")
    args = ap.parse_args(argv)
    ops = set(args.ops.split(",")) if args.ops else None
    if ops and ops - set(CASE_BUILDERS):
        ap.error(f"unknown ops {sorted(ops - set(CASE_BUILDERS))}; choose from {list(CASE_BUILDERS)}")
    if args.small or not torch.cuda.is_available():
        where = "compiled on CUDA" if torch.cuda.is_available() else "Triton interpreter on the CPU"
        print(f"correctness at small sizes ({where}):")
        results = run_checks("small", ops, (torch.float32, torch.bfloat16))
        for case, err, ok in results:
            print(f"  {'PASS' if ok else 'FAIL'}  {case.op:<18} {case.name:<40} max rel err {err:.2e} (tol {case.tol:.0e})")
        return 0 if all(ok for _, _, ok in results) else 1

    name = torch.cuda.get_device_name()
    bw, peak = next((v for k, v in PEAKS.items() if k in name), PEAKS["H100"])
    print(f"{name}: roofline at {bw / 1e12:.2f} TB/s, {peak / 1e12:.0f} TFLOP/s bf16")
    print(f"{'op':<18} {'case':<42} {'check':<14} {'triton us':>10} {'torch us':>10} {'speedup':>8} {'roof us':>9} {'%roof':>6}")
    failed = 0
    torch.manual_seed(0)
    for op in CASE_BUILDERS:
        if ops is not None and op not in ops:
            continue
        # One op's inputs at a time: the attention references alone hold GBs of scores.
        for case in build_cases("full", torch.device("cuda"), (torch.bfloat16,), {op}):
            err = _max_error(case.triton(), case.ref())  # the first call also compiles
            ok = err <= case.tol
            failed += not ok
            t_ms, r_ms = _time_ms(case.triton), _time_ms(case.ref, iters=5)
            roof_ms = max(case.bytes / bw, case.flops / peak) * 1e3
            print(f"{case.op:<18} {case.name:<42} {('ok' if ok else 'FAIL') + f' {err:.0e}':<14} "
                  f"{t_ms * 1e3:>10.1f} {r_ms * 1e3:>10.1f} {r_ms / t_ms:>7.1f}x {roof_ms * 1e3:>9.1f} "
                  f"{100 * roof_ms / t_ms:>5.0f}%")
        torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
