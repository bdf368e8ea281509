"""The kernel benchmark script: its ratio summary (synthetic numbers) and, marked slow, a CPU dry run."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glmwb.kernels.bench.bench_kernels import GLM4_9B, Bench, Row, main, ratio_summary, read_csv, write_csv

REPO = Path(__file__).resolve().parents[2]


def synthetic_rows(speedup: float, fraction: float, mem_ratio: float, liger: bool) -> list[Row]:
    """Rows as a GPU run would write them: ours is ``speedup`` x faster than every baseline."""
    rows = []
    providers = ["eager", "compile", "separate"] + (["liger"] if liger else [])
    for op in ("rmsnorm", "add_rmsnorm", "swiglu", "rotary"):
        for n in GLM4_9B.tokens:
            for mode in ("fwd", "bwd", "full"):
                rows.append(Row(op, "triton", mode, n, 1.0, 1.0, "GB/s", fraction, 100.0))
                if op == "rotary":
                    rows.append(Row(op, "triton_inplace", mode, n, 1.0, 1.0, "GB/s", fraction, 0.0))
                rows += [
                    Row(op, p, mode, n, speedup, 1.0, "GB/s", fraction / speedup, 100.0) for p in providers
                ]
    for op, n in (("fused_linear_ce", GLM4_9B.ce_tokens), ("logprobs", 32 * 1024)):
        for mode in ("fwd", "bwd", "full", "no_grad"):
            rows.append(Row(op, "triton", mode, n, 1.0, 1.0, "TFLOP/s", 0.5, 100.0 * mem_ratio))
            rows.append(Row(op, "eager", mode, n, speedup, 1.0, "TFLOP/s", 0.5, 100.0))
    return rows


def gpu_bench() -> Bench:
    bench = Bench(torch.device("cpu"), dry_run=False)
    bench.cuda = True  # judge the synthetic rows as a GPU run's
    return bench


def test_ratio_summary_reports_the_measured_ratios():
    """Synthetic rows where ours is exactly `speedup` x faster than every baseline and uses `mem_ratio` of
    eager's memory: the summary prints those ratios, no verdicts; Liger lines only when Liger ran."""
    lines = ratio_summary(synthetic_rows(20.0, 0.9, 0.1, liger=True), gpu_bench(), GLM4_9B)
    by_name = dict(line.split(": ", 1) for line in lines)
    assert by_name["RMSNorm fwd, fraction of copy bandwidth"] == "90%"
    assert by_name["RMSNorm fwd+bwd, speed-up over liger"] == "20.00x"
    assert by_name["partial rotary fwd+bwd, speed-up over compile"] == "20.00x"
    assert by_name["fused linear CE peak memory / eager at 32768 tokens"] == "10%"
    assert by_name["fused linear CE time / eager at 32768 tokens (fwd+bwd)"] == "0.05x"
    assert not any(word in line for line in lines for word in ("PASS", "FAIL", ">="))

    lines = ratio_summary(synthetic_rows(0.5, 0.5, 0.5, liger=False), gpu_bench(), GLM4_9B)
    by_name = dict(line.split(": ", 1) for line in lines)
    assert by_name["SwiGLU fwd+bwd, speed-up over eager"] == "0.50x"
    assert not any("liger" in name for name in by_name)
    dry = Bench(torch.device("cpu"), dry_run=True)
    assert ratio_summary([], dry, GLM4_9B) == [
        "dry run: no timings to compare (ratios are printed only on a CUDA GPU)"
    ]


def test_csv_round_trip_and_replot(tmp_path):
    rows = synthetic_rows(2.0, 0.9, 0.1, liger=True)
    rows.append(Row("rmsnorm", "eager", "full", 4096, None, None, "GB/s", None, None, "OOM"))
    write_csv(rows, tmp_path / "run.csv")
    assert read_csv(tmp_path / "run.csv") == rows
    assert main(["--replot", str(tmp_path / "run.csv"), "--title", "synthetic"]) == 0
    assert (tmp_path / "run.png").stat().st_size > 10_000


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"} if not torch.cuda.is_available() else dict(os.environ)
    result = subprocess.run(
        [sys.executable, "-m", "glmwb.kernels.bench.bench_kernels", "--dry-run", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DRY-RUN: no timing claims" in result.stdout
    with (tmp_path / "bench_kernels.csv").open() as f:
        rows = list(csv.DictReader(f))
    seen = {(r["op"], r["provider"]) for r in rows}
    for op in ("rmsnorm", "add_rmsnorm", "swiglu", "rotary", "fused_linear_ce", "logprobs"):
        assert {(op, "eager"), (op, "compile"), (op, "triton")} <= seen, op
    assert ("add_rmsnorm", "separate") in seen
    assert all(r["ms"] for r in rows), "every provider ran"
    assert (tmp_path / "bench_kernels.png").stat().st_size > 10_000


class _CountingTimer:
    """Stands in for ``Bench`` on the CPU: runs each candidate once instead of timing it."""

    device = torch.device("cpu")
    copy_gbps = 1.0

    def __init__(self) -> None:
        self.calls = 0

    def time_ms(self, fn, graph=False):
        fn()
        self.calls += 1
        return 1.0 + self.calls % 7  # distinct "times", so the report has an order to print


def test_every_sweep_configuration_computes_the_same_function(capsys):
    # tune_kernels checks each launch configuration against the default before timing it and skips
    # (prints SKIPPED) the ones that differ or fail; here, in the interpreter, none may be skipped.
    from glmwb.kernels.bench import tune_kernels

    timer = _CountingTimer()
    rows = tune_kernels.sweep_rmsnorm(timer, [9], 40, torch.bfloat16)
    rows += tune_kernels.sweep_rotary(timer, [6], 4, 2, 16, torch.bfloat16)
    out = capsys.readouterr().out
    assert "SKIPPED" not in out, out
    ops = {r["op"] for r in rows}
    assert ops == {
        "rmsnorm_fwd",
        "rmsnorm_add_fwd",
        "rmsnorm_bwd",
        "rmsnorm_add_bwd",
        "rotary",
        "rotary_inplace",
    }
    assert len(rows) == timer.calls == 2 * 10 + 2 * 73 + 2 * 21
    rows.sort(key=lambda r: (r["op"], r["tokens"]))
    tune_kernels.report(rows)
    assert "rotary_inplace, 6 tokens: default" in capsys.readouterr().out


def test_a_configuration_that_computes_something_else_is_skipped(monkeypatch, capsys):
    from glmwb.kernels import rotary
    from glmwb.kernels.bench import tune_kernels

    launch = rotary._launch

    def wrong_with_two_tokens_per_program(*args, **kw):  # a planted bug in one configuration
        launch(*args, **kw)
        if kw.get("block_t") == 2:
            args[2].mul_(1.5)

    monkeypatch.setattr(rotary, "_launch", wrong_with_two_tokens_per_program)
    rows = tune_kernels.sweep_rotary(_CountingTimer(), [24], 4, 2, 16, torch.float32)
    out = capsys.readouterr().out
    assert out.count("SKIPPED") == 2 * 5 and "block_t=2" in out  # 5 warp counts, both layouts
    assert not any("block_t=2 " in r["config"] for r in rows)
