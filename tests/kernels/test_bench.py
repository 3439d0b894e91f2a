import torch

from vlmserve.kernels import bench


def test_bench_correctness_checks_pass_at_tiny_sizes():
    results = bench.run_checks("tiny")
    assert {case.op for case, _, _ in results} == set(bench.CASE_BUILDERS)
    failures = [(case.op, case.name, err) for case, err, ok in results if not ok]
    assert not failures, f"kernels disagree with their references: {failures}"


def test_bench_error_measure_flags_nan_and_shape_mismatch():
    good = torch.ones(3)
    assert bench._max_error(good, good.clone()) == 0.0
    assert bench._max_error(torch.tensor([1.0, float("nan"), 1.0]), good) == float("inf")
    assert bench._max_error(torch.ones(2), good) == float("inf")


def test_bench_cli_small_run_reports_every_check(capsys):
    assert bench.main(["--small", "--ops", "rms_norm,write_kv"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("PASS") == 4 and "FAIL" not in printed
