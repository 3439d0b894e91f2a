#!/usr/bin/env bash
# The one command for a lent GPU machine (the device tool's `run`, from the repo root):
#   bash scripts/gpu_check_on_device.sh
# That machine's image has its own python3 with torch, Triton, transformers, tokenizers,
# safetensors, Pillow, jinja2, PyYAML, httpx and pytest, and reaches no registry: vlmserve is
# installed from this checkout with no dependencies (the check imports nothing else), and the
# report lands under $OUT/gpu_check (report.md first, report.json and the logs beside it).
set -uo pipefail
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
out="${OUT:-/tmp/out}/gpu_check"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/nvidia-smi.csv"
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/vlmsite . >"$out/install.log" 2>&1 \
  || { echo "install failed: see $out/install.log"; tail -20 "$out/install.log"; exit 1; }
export PYTHONPATH=/tmp/vlmsite
export VLMSERVE_CACHE=/tmp/vlmserve-cache
# Under 8 minutes on one H100/H200; the per-call limit is 10.
timeout 540 python3 -m vlmserve.gpu_check --out "$out" "$@" 2>&1 | tee "$out/console.log"
rc=${PIPESTATUS[0]}
cat "$out/report.md" 2>/dev/null
exit "$rc"
