"""`vlmserve bench --sampling checkpoint` applies the checkpoint's published sampling defaults."""

import pytest

from vlmserve.bench import run_offline_bench
from vlmserve.config import EngineConfig


def test_bench_with_the_checkpoint_sampling_defaults(tiny_ckpt, capsys):
    stats = run_offline_bench(EngineConfig(model=str(tiny_ckpt)), num_requests=2, image_size="56x56",
                              images_per_request=1, prompt_words=4, max_tokens=3, seed=0, sampling="checkpoint")
    assert stats["requests"] == 2 and stats["forward_passes"] >= 3
    out = capsys.readouterr().out
    assert "sampling checkpoint: temperature=0.1 top_p=0.001 top_k=1" in out and "repetition_penalty=1.05" in out


def test_bench_refuses_an_unknown_sampling_mode(tiny_ckpt):
    with pytest.raises(ValueError, match="sampling must be one of greedy, checkpoint"):
        run_offline_bench(EngineConfig(model=str(tiny_ckpt)), num_requests=1, image_size="56x56",
                          images_per_request=1, prompt_words=4, max_tokens=1, seed=0, sampling="nucleus")
