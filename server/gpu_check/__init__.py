"""`python -m vlmserve.gpu_check --out DIR [--dry]`: the prepared check for a lent GPU.

One command, one report (`DIR/report.json` and `DIR/report.md`), sections run in order, each
timed and each failing on its own without stopping the rest:

- `env`: torch, CUDA, Triton, the device and its memory.
- `kernels`: every kernel test of `tests/kernels` compiled on the device against its PyTorch
  reference (the tests parametrize fp32, fp16 and bf16); needs a checkout (the tests are not
  installed).
- `parity`: each family's tiny checkpoint served on the device through the Triton backend
  gives the greedy tokens of the CPU reference backend, which CI holds to transformers.
- `graphs`: decode with CUDA graphs against eager, where graphs exist.
- `throughput`: a random-weight Qwen2-VL at the published 2B shape (152k vocabulary, bf16):
  decode tokens/s against the HBM roofline (weight bytes / bandwidth), prefill MFU, and the
  offline image workload of `vlmserve bench`; the engine's memory sizing log.

`--dry` runs every section at toy sizes on the CPU (Triton in its interpreter): it proves the
check starts and reports, so the minutes of a lent GPU go to measuring, not to debugging.
"""
