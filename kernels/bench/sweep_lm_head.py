"""Sweeps for the chunked LM-head kernels on a GPU: how the d-weight accumulation and the chunk size trade
time against memory at GLM-4-9B's vocabulary (151,552 x 4,096, bf16).

    python -m glmwb.kernels.bench.sweep_lm_head                 # both sweeps, a table per sweep
    python -m glmwb.kernels.bench.sweep_lm_head --tokens 32768 --chunks 1024 2048 4096 8192

1. ``accumulate``: one chunk's d weight, ``acc (V, D) fp32 += g^T (V, n) @ h (n, D)`` with g, h bf16, by
   each way PyTorch offers (``addmm`` with ``out_dtype`` into acc, an fp32 product then ``add_``, a bf16
   accumulator as Liger-Kernel keeps, and the plain bf16 product as the time floor): median ms and the
   peak memory above the inputs.
2. ``chunks``: ``fused_linear_cross_entropy`` (forward + backward) and ``linear_selective_logprobs``
   (forward + backward) at each chunk size: ms and peak memory, next to the eager PyTorch code.
Numbers only; nothing here is a target. Results go in docs/benchmarks.md with device, date and commit.
"""

from __future__ import annotations

import argparse
import functools
import math

import torch
import torch.nn.functional as F


def _peak_mb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100))


def _accumulate_variants(acc, acc_bf16, g, h) -> dict:
    vocab = acc.shape[0]
    variants = {
        "addmm(out_dtype=fp32, out=acc)": lambda: torch.addmm(
            acc, g.t(), h, out_dtype=torch.float32, out=acc
        ),
        "acc.add_(mm(out_dtype=fp32))": lambda: acc.add_(torch.mm(g.t(), h, out_dtype=torch.float32)),
        "bf16 acc.addmm_ (Liger)": lambda: acc_bf16.addmm_(g.t(), h),
        "bf16 mm, no accumulation (floor)": lambda: torch.mm(g.t(), h),
    }
    for k in (4, 16):
        step = math.ceil(vocab / k)

        def blocked(step=step):
            for s in range(0, vocab, step):
                part = acc[s : s + step]
                torch.addmm(part, g[:, s : s + step].t(), h, out_dtype=torch.float32, out=part)

        variants[f"addmm(out_dtype) in {k} vocab blocks"] = blocked
    return variants


def sweep_accumulate(vocab: int, hidden: int, rows: list[int]) -> None:
    print(f"\nd-weight accumulation, acc ({vocab} x {hidden}) += g^T h, g and h bf16")
    print(f"{'rows':>6} {'variant':34s} {'ms':>8} {'TFLOP/s':>8} {'peak MiB':>9}")
    acc = torch.zeros(vocab, hidden, device="cuda")
    acc_bf16 = torch.zeros(vocab, hidden, device="cuda", dtype=torch.bfloat16)
    for n in rows:
        g = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16)
        h = torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16)
        flops = 2 * n * vocab * hidden
        for name, fn in _accumulate_variants(acc, acc_bf16, g, h).items():
            try:
                peak = _peak_mb(fn)
                ms = _ms(fn)
                print(f"{n:6d} {name:34s} {ms:8.3f} {flops / ms / 1e9:8.0f} {peak:9.0f}", flush=True)
            except Exception as error:  # noqa: BLE001 - a variant this PyTorch lacks is reported, not fatal
                print(f"{n:6d} {name:34s} failed: {type(error).__name__}: {error}", flush=True)
    torch.cuda.empty_cache()


def sweep_chunks(vocab: int, hidden: int, tokens: int, chunks: list[int]) -> None:
    from glmwb.kernels.fused_linear_ce import default_chunk_size, fused_linear_cross_entropy
    from glmwb.kernels.logprobs import linear_selective_logprobs

    print(f"\nchunk sizes at {tokens} tokens (default chunk {default_chunk_size(tokens, hidden, vocab)})")
    print(f"{'op':16s} {'chunk':>8} {'ms':>8} {'peak MiB':>9}")
    h = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.nn.Parameter((torch.randn(vocab, hidden, device="cuda") / math.sqrt(hidden)).to(torch.bfloat16))
    labels = torch.randint(0, vocab, (tokens,), device="cuda")
    labels[::10] = -100
    upstream = torch.randn(tokens, device="cuda")

    def full(forward, grad=None):
        h.grad = w.grad = None
        out = forward()
        out.backward(grad)

    def eager_ce():
        return F.cross_entropy(F.linear(h, w), labels)

    def eager_lp():
        logits = F.linear(h, w).float()
        valid = labels != -100
        return (
            torch.log_softmax(logits, -1).gather(-1, torch.where(valid, labels, 0)[:, None]).squeeze(-1)
            * valid
        )

    runs = {("ce", "eager"): functools.partial(full, eager_ce)}
    runs[("logprobs", "eager")] = functools.partial(full, eager_lp, upstream)
    for c in chunks:
        runs[("ce", str(c))] = functools.partial(
            full, lambda c=c: fused_linear_cross_entropy(h, w, labels, chunk_size=c)
        )
        runs[("logprobs", str(c))] = functools.partial(
            full, lambda c=c: linear_selective_logprobs(h, w, labels, chunk_size=c), upstream
        )
    for (op, name), fn in sorted(runs.items()):
        try:
            peak = _peak_mb(fn)
            print(f"{op:16s} {name:>8} {_ms(fn):8.2f} {peak:9.0f}", flush=True)
        except torch.OutOfMemoryError:
            print(f"{op:16s} {name:>8} OOM", flush=True)
            h.grad = w.grad = None
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=151552)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument(
        "--rows", nargs="+", type=int, default=[1024, 4096], help="chunk rows for the accumulate sweep"
    )
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--chunks", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    p.add_argument("--sweeps", nargs="+", choices=("accumulate", "chunks"), default=["accumulate", "chunks"])
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_lm_head: needs a CUDA GPU")
        return 2
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    if "accumulate" in args.sweeps:
        sweep_accumulate(args.vocab, args.hidden, args.rows)
    if "chunks" in args.sweeps:
        sweep_chunks(args.vocab, args.hidden, args.tokens, args.chunks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
