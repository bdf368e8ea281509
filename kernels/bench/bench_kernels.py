"""Kernel benchmarks at GLM-4-9B shapes: ours (Triton) next to eager PyTorch, ``torch.compile`` and Liger-Kernel.

    python -m glmwb.kernels.bench.bench_kernels                     # on a CUDA GPU: every op, CSV + plot + ratios
    python -m glmwb.kernels.bench.bench_kernels --ops rmsnorm swiglu --tokens 8192 16384
    python -m glmwb.kernels.bench.bench_kernels --dry-run           # CPU: tiny shapes, Triton interpreter, no claims

For each op, provider and mode (``fwd``, ``bwd``, ``full`` = forward + backward) it records the time
(``triton.testing.do_bench``, median ms), the achieved GB/s (memory-bound ops: the bytes the op must read
and write at least once) or TFLOP/s (GEMM-bound ops: the useful matmul FLOPs), the fraction of the device's
ceiling MEASURED at the start of the run (a large ``tensor.copy_`` for bandwidth, a bf16 8192^3 matmul for
FLOP/s), and the peak extra memory of a full pass (``torch.cuda.max_memory_allocated`` above the inputs).

Shapes (GLM-4-9B): hidden 4,096; intermediate 13,696; 32 query / 2 key-value heads of 128 (rotary on the
first 64 dims, interleaved); vocab 151,552; 4k-32k tokens; fused linear CE at 32,768 tokens and fused
log-probs at 32 x 1,024 tokens. bf16 throughout.

Baselines: "eager" is the plain PyTorch a user would write (``transformers``' GLM modules and functions where
they exist), "compile" is ``torch.compile`` of that same function, "liger" is Liger-Kernel (``pip install
liger-kernel``; RMSNorm, fused add + RMSNorm when the installed version has it, SwiGLU as its GLM-4 patch
runs it on the fused gate_up (chunk, then its function) and, as "liger_sep", on separate contiguous gate and up
tensors (its own layout, for reference), fused linear CE). Liger has no GLM
(partial, interleaved) rotary and no selective log-prob op: those columns are absent. When Liger cannot be
imported or run (no GPU), its columns are skipped.

Output: ``<out>/bench_kernels.csv``, ``<out>/bench_kernels.png`` and the ratios measured side by side (speed-up
over each baseline, fraction of the copy bandwidth, peak memory against eager). ``--dry-run`` runs every provider once on tiny shapes (on the CPU under TRITON_INTERPRET=1,
``torch.compile`` with the "eager" backend) to prove the script works; its numbers mean nothing.
"""

from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv:  # the interpreter must be chosen before triton is first imported
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass, fields  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch._functorch.config as torch_functorch_config  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# ----------------------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class Shapes:
    hidden: int
    intermediate: int
    q_heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tokens: tuple[int, ...]  # sweep for rmsnorm / add+rmsnorm / swiglu / rotary
    ce_tokens: int  # fused linear CE
    logprob_batch: tuple[int, int]  # (sequences, length) for fused log-probs


GLM4_9B = Shapes(4096, 13696, 32, 2, 128, 151552, (4096, 8192, 16384, 32768), 32768, (32, 1024))
DRY_RUN = Shapes(64, 96, 4, 2, 16, 1031, (48, 80), 64, (2, 24))
EPS = 1.5625e-07
ALL_OPS = ("rmsnorm", "add_rmsnorm", "swiglu", "rotary", "fused_linear_ce", "logprobs")


@dataclass
class Row:
    op: str
    provider: str
    mode: str  # fwd | bwd | full
    tokens: int
    ms: float | None
    throughput: float | None  # GB/s or TFLOP/s
    unit: str
    fraction_of_ceiling: float | None
    peak_mem_mb: float | None
    note: str = ""


# ----------------------------------------------------------------------------------------------------------
# Measuring


class Bench:
    def __init__(self, device: torch.device, dry_run: bool, warmup_ms: int = 25, rep_ms: int = 100) -> None:
        self.device, self.dry_run = device, dry_run
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        self.cuda = device.type == "cuda"
        self.copy_gbps: float | None = None
        self.matmul_tflops: float | None = None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time_ms(self, fn: Callable[[], object], graph: bool = False) -> float:
        """Median ms of ``fn`` by ``triton.testing.do_bench`` (L2 flushed before every call, CUDA events).

        graph=True: ``fn`` is captured once in a CUDA graph and the graph's replay is timed, so the time is
        the GPU's alone, not Python's and the launcher's (which would dominate a 50 us memory-bound op and
        is hidden by asynchrony in a real training step). Falls back to timing ``fn`` if capture fails.
        """
        if self.dry_run or not self.cuda:
            fn()  # warm (compiles / traces)
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        import triton.testing

        if graph:
            try:
                captured = capture_graph(fn)
            except Exception as error:  # noqa: BLE001 - report, then time it without a graph
                print(f"  (CUDA graph capture failed, timed without: {type(error).__name__}: {error})")
                torch.cuda.synchronize()
            else:
                try:
                    return float(
                        triton.testing.do_bench(captured.replay, warmup=self.warmup_ms, rep=self.rep_ms)
                    )
                finally:
                    del captured
        return float(triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms))

    def peak_mb(self, fn: Callable[[], object]) -> float | None:
        """Peak memory above what was allocated before ``fn`` (the inputs), in MiB; None off CUDA."""
        if not self.cuda:
            fn()
            return None
        self.sync()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        self.sync()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    def measure_ceilings(self) -> None:
        """Copy bandwidth (read + write bytes of a large copy_) and bf16 matmul TFLOP/s of this device."""
        if not self.cuda or self.dry_run:
            return
        n = 1 << 29  # 1 GiB of bf16 each way
        src = torch.empty(n, dtype=torch.bfloat16, device=self.device).normal_()
        self.copy_gbps = (
            2 * n * 2 / self.time_ms(functools.partial(torch.Tensor.copy_, torch.empty_like(src), src)) / 1e6
        )
        m = 8192
        a = torch.randn(m, m, dtype=torch.bfloat16, device=self.device)
        self.matmul_tflops = 2 * m**3 / self.time_ms(functools.partial(torch.mm, a, a.T.contiguous())) / 1e9
        torch.cuda.empty_cache()


def capture_graph(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """``fn`` captured in a CUDA graph, after two warm-up calls on a side stream (PyTorch's recipe)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def fwd_bwd_fns(
    forward: Callable[[], object], inputs: list[torch.Tensor], upstream: Callable[[object], list]
) -> dict[str, Callable[[], object]]:
    """fwd / bwd / full callables for an op (bwd replays the backward of one retained forward graph) and
    release, which frees that graph."""

    def full():
        for t in inputs:
            t.grad = None
        out = forward()
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, upstream(out))

    state = {}

    def bwd():
        if "graph" not in state:
            out = forward()
            state["graph"] = (out if isinstance(out, tuple) else (out,), upstream(out))
        for t in inputs:
            t.grad = None
        outs, grads = state["graph"]
        torch.autograd.backward(outs, grads, retain_graph=True)

    def fwd():
        with torch.enable_grad():
            return forward()

    return {"fwd": fwd, "bwd": bwd, "full": full, "release": state.clear}


# ----------------------------------------------------------------------------------------------------------
# Providers


def liger_modules() -> dict[str, object]:
    """What the installed Liger-Kernel offers (empty when it is missing or cannot run here)."""
    if not torch.cuda.is_available():
        return {}
    found: dict[str, object] = {}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerRMSNorm

        found["rmsnorm"] = LigerRMSNorm
        found["fused_linear_ce"] = LigerFusedLinearCrossEntropyLoss
    except Exception:  # noqa: BLE001 - any import failure means "no Liger column"
        return {}
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        found["swiglu"] = LigerSiLUMulFunction
    except Exception:  # noqa: BLE001
        pass
    try:
        from liger_kernel.transformers import LigerFusedAddRMSNorm

        found["add_rmsnorm"] = LigerFusedAddRMSNorm
    except Exception:  # noqa: BLE001
        pass
    return found


def try_liger(what: str, build: Callable[[], Callable]) -> Callable | None:
    """Build a Liger provider; None (column skipped, reason printed) if this Liger version disagrees."""
    try:
        return build()
    except Exception as error:  # noqa: BLE001 - an API change in Liger must not stop the run
        print(f"  liger {what}: skipped ({type(error).__name__}: {error})")
        return None


def compiled(fn: Callable, dry_run: bool) -> Callable:
    # The dry run checks that dynamo traces the baselines; inductor codegen on a CPU would take minutes.
    return torch.compile(fn, backend="eager" if dry_run else "inductor", dynamic=False)


# ----------------------------------------------------------------------------------------------------------
# Ops: each returns rows for every provider and mode


def _rows_for(
    bench: Bench,
    op: str,
    tokens: int,
    providers: dict[str, dict[str, Callable]],
    work: dict[str, float],
    unit: str,
    notes: dict[str, str] | None = None,
) -> list[Row]:
    """Time every (provider, mode); ``work`` is GB (unit GB/s) or TFLOP (unit TFLOP/s) per mode.

    Memory-bound ops (GB/s) are timed as CUDA-graph replays (``Bench.time_ms(graph=True)``): every provider
    gets the same treatment, and the figure is the kernels' time, not the Python around them."""
    rows = []
    ceiling = bench.copy_gbps if unit == "GB/s" else bench.matmul_tflops
    for provider, fns in providers.items():
        note = (notes or {}).get(provider, "")
        peak = None
        try:
            peak = bench.peak_mb(fns["full"])
        except torch.OutOfMemoryError:
            rows.append(Row(op, provider, "full", tokens, None, None, unit, None, None, "OOM"))
            torch.cuda.empty_cache()
            continue
        for mode in ("fwd", "bwd", "full"):
            fn = fns[mode]
            try:
                ms = bench.time_ms(fn, graph=unit == "GB/s")
            except torch.OutOfMemoryError:
                rows.append(Row(op, provider, mode, tokens, None, None, unit, None, peak, "OOM"))
                torch.cuda.empty_cache()
                continue
            throughput = work[mode] / ms * 1e3  # GB or TFLOP per ms -> per second
            fraction = throughput / ceiling if ceiling else None
            rows.append(Row(op, provider, mode, tokens, ms, throughput, unit, fraction,
                            peak if mode == "full" else None, note))  # fmt: skip
        fns["release"]()  # drop the retained graph of the bwd timing before the next provider
        print(f"  {op:16s} {provider:9s} {tokens:6d} tokens: " + ", ".join(
            f"{r.mode} {r.ms:.3f} ms" for r in rows if r.provider == provider and r.ms is not None
        ) + (f", peak {peak:.0f} MiB" if peak is not None else ""), flush=True)  # fmt: skip
    return rows


def bench_rmsnorm(bench: Bench, shapes: Shapes, liger: dict, dtype: torch.dtype) -> list[Row]:
    from transformers.models.glm.modeling_glm import GlmRMSNorm

    from glmwb.kernels.rmsnorm import rmsnorm

    rows = []
    h = shapes.hidden
    for n in shapes.tokens:
        x = torch.randn(n, h, device=bench.device, dtype=dtype, requires_grad=True)
        weight = torch.nn.Parameter(torch.rand(h, device=bench.device, dtype=dtype) + 0.5)
        dy = torch.randn(n, h, device=bench.device, dtype=dtype)
        eager = GlmRMSNorm(h, EPS).to(bench.device, dtype)
        eager.weight = weight
        compiled_norm = compiled(eager, bench.dry_run)
        forwards = {
            "eager": lambda e=eager, x=x: e(x),
            "compile": lambda c=compiled_norm, x=x: c(x),
            "triton": lambda x=x, w=weight: rmsnorm(x, w, EPS),
        }
        lig = "rmsnorm" in liger and try_liger(
            "rmsnorm", lambda: liger["rmsnorm"](h, eps=EPS, casting_mode="llama").to(bench.device, dtype)
        )
        if lig:
            lig.weight = weight
            forwards["liger"] = lambda m=lig, x=x: m(x)
        elem = x.element_size()
        work = {"fwd": 2 * n * h * elem / 1e9, "bwd": 3 * n * h * elem / 1e9, "full": 5 * n * h * elem / 1e9}
        providers = {k: fwd_bwd_fns(f, [x, weight], lambda out, dy=dy: [dy]) for k, f in forwards.items()}
        rows += _rows_for(bench, "rmsnorm", n, providers, work, "GB/s")
    return rows


def bench_add_rmsnorm(bench: Bench, shapes: Shapes, liger: dict, dtype: torch.dtype) -> list[Row]:
    from transformers.models.glm.modeling_glm import GlmRMSNorm

    from glmwb.kernels.rmsnorm import rmsnorm, rmsnorm_add

    rows = []
    h = shapes.hidden
    for n in shapes.tokens:
        x = torch.randn(n, h, device=bench.device, dtype=dtype, requires_grad=True)
        # In a model x and the residual are both outputs of earlier ops and receive d(x + residual) by
        # reference. Two leaves would each copy it into their .grad (a pass over the tensor that no model
        # makes, for every provider alike), so here only x is a leaf that takes a gradient.
        res = torch.randn(n, h, device=bench.device, dtype=dtype)
        weight = torch.nn.Parameter(torch.rand(h, device=bench.device, dtype=dtype) + 0.5)
        dy, dres = torch.randn_like(x), torch.randn_like(x)
        eager = GlmRMSNorm(h, EPS).to(bench.device, dtype)
        eager.weight = weight

        def eager_fn(x=x, res=res, norm=eager):
            new_res = x + res
            return norm(new_res), new_res

        compiled_fn = compiled(eager_fn, bench.dry_run)

        def separate(x=x, res=res, w=weight):  # our RMSNorm kernel after a plain add
            new_res = x + res
            return rmsnorm(new_res, w, EPS), new_res

        forwards = {
            "eager": eager_fn,
            "compile": lambda c=compiled_fn: c(),
            "separate": separate,
            "triton": lambda x=x, res=res, w=weight: rmsnorm_add(x, res, w, EPS),
        }
        lig = "add_rmsnorm" in liger and try_liger(
            "add_rmsnorm",
            lambda: liger["add_rmsnorm"](h, eps=EPS, casting_mode="llama").to(bench.device, dtype),
        )
        if lig:
            lig.weight = weight
            forwards["liger"] = lambda m=lig, x=x, res=res: m(x, res)
        elem = x.element_size()
        # fwd: read x, res; write y, new_res. bwd: read dy, dres, new_res; write dx (= dres_in).
        work = {"fwd": 4 * n * h * elem / 1e9, "bwd": 4 * n * h * elem / 1e9, "full": 8 * n * h * elem / 1e9}
        providers = {
            k: fwd_bwd_fns(f, [x, res, weight], lambda out, dy=dy, dres=dres: [dy, dres])
            for k, f in forwards.items()
        }
        rows += _rows_for(bench, "add_rmsnorm", n, providers, work, "GB/s")
    return rows


def bench_swiglu(bench: Bench, shapes: Shapes, liger: dict, dtype: torch.dtype) -> list[Row]:
    from glmwb.kernels.swiglu import swiglu

    rows = []
    inter = shapes.intermediate
    for n in shapes.tokens:
        gate_up = torch.randn(n, 2 * inter, device=bench.device, dtype=dtype, requires_grad=True)
        dout = torch.randn(n, inter, device=bench.device, dtype=dtype)

        def eager_fn(gate_up=gate_up):
            gate, up = gate_up.chunk(2, dim=-1)  # transformers' GlmMLP
            return up * F.silu(gate)

        compiled_fn = compiled(eager_fn, bench.dry_run)
        forwards = {
            "eager": eager_fn,
            "compile": lambda c=compiled_fn: c(),
            "triton": lambda g=gate_up: swiglu(g),
        }
        inputs = [gate_up]
        notes = {}
        if "swiglu" in liger:
            # "liger": as Liger's GLM-4 patch runs it (LigerPhi3SwiGLUMLP: chunk the fused gate_up, then its
            # function, which makes the halves contiguous). "liger_sep": Liger's best case, gate and up
            # already separate contiguous tensors (not GLM's layout; for reference, no target).
            forwards["liger"] = lambda g=gate_up: liger["swiglu"].apply(*g.chunk(2, dim=-1))
            notes["liger"] = "Liger's GLM-4 path: chunk(gate_up) + LigerSiLUMulFunction"
            gate = torch.randn(n, inter, device=bench.device, dtype=dtype, requires_grad=True)
            up = torch.randn(n, inter, device=bench.device, dtype=dtype, requires_grad=True)
            forwards["liger_sep"] = lambda g=gate, u=up: liger["swiglu"].apply(g, u)
            inputs += [gate, up]
            notes["liger_sep"] = "separate contiguous gate / up tensors (Liger's own layout, not GLM's)"
        elem = gate_up.element_size()
        work = {
            "fwd": 3 * n * inter * elem / 1e9,
            "bwd": 5 * n * inter * elem / 1e9,
            "full": 6 * n * inter * elem / 1e9,
        }
        providers = {k: fwd_bwd_fns(f, inputs, lambda out, d=dout: [d]) for k, f in forwards.items()}
        rows += _rows_for(bench, "swiglu", n, providers, work, "GB/s", notes)
    return rows


def bench_rotary(bench: Bench, shapes: Shapes, liger: dict, dtype: torch.dtype) -> list[Row]:
    from transformers.models.glm.modeling_glm import apply_rotary_pos_emb

    from glmwb.kernels.rotary import apply_rotary, rotary_inv_freq

    rows = []
    hq, hk, hd = shapes.q_heads, shapes.kv_heads, shapes.head_dim
    inv_freq = rotary_inv_freq(hd // 2, 10000.0, device=bench.device)  # GLM: half of each head rotates
    for n in shapes.tokens:
        batch, seq = max(1, n // 4096), min(n, 4096)  # 4,096-token sequences
        q = torch.randn(batch, seq, hq, hd, device=bench.device, dtype=dtype, requires_grad=True)
        k = torch.randn(batch, seq, hk, hd, device=bench.device, dtype=dtype, requires_grad=True)
        position_ids = torch.arange(seq, device=bench.device)[None].expand(batch, seq)
        dq, dk = torch.randn_like(q), torch.randn_like(k)

        def eager_fn(q=q, k=k, position_ids=position_ids):
            # GlmRotaryEmbedding (cos / sin per call) + apply_rotary_pos_emb, on the (B, T, H, D) layout
            freqs = position_ids[..., None].float() * inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
            return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)

        compiled_fn = compiled(eager_fn, bench.dry_run)
        forwards = {
            "eager": eager_fn,
            "compile": lambda c=compiled_fn: c(),
            "triton": lambda q=q, k=k, p=position_ids: apply_rotary(q, k, p, inv_freq),
        }
        elem = q.element_size()
        qk = batch * seq * (hq + hk) * hd * elem / 1e9
        work = {"fwd": 2 * qk, "bwd": 2 * qk, "full": 4 * qk}
        providers = {
            k_: fwd_bwd_fns(f, [q, k], lambda out, dq=dq, dk=dk: [dq, dk]) for k_, f in forwards.items()
        }
        providers["triton_inplace"] = _rotary_inplace_provider(
            bench, batch, seq, shapes, position_ids, inv_freq, dtype
        )
        notes = {"triton_inplace": "apply_rotary_qkv_'s two launches (fwd, bwd) on a fused qkv buffer, timed "
                                   "without autograd; rotates the first half of each head in place"}  # fmt: skip
        rows += _rows_for(bench, "rotary", n, providers, work, "GB/s", notes)
    return rows


def _rotary_inplace_provider(bench, batch, seq, shapes, position_ids, inv_freq, dtype) -> dict[str, Callable]:
    """Our GLM's rotary path (``apply_rotary_qkv_``): in place on the fused qkv projection output, forward
    and backward one launch each. An in-place op needs a non-leaf input that autograd has not seen; in a
    benchmark loop each call would chain onto the last, so the two launches the autograd Function makes
    (``_rotary_inplace`` with +angles, then with -angles on the gradient) are timed directly."""
    from glmwb.kernels.rotary import _qk_views, _rotary_inplace

    hq, hk, hd = shapes.q_heads, shapes.kv_heads, shapes.head_dim
    qkv = torch.randn(batch * seq, (hq + 2 * hk) * hd, device=bench.device, dtype=dtype)
    d_qkv = torch.randn_like(qkv)
    q, k = _qk_views(qkv, position_ids, hq, hk)
    dq, dk = _qk_views(d_qkv, position_ids, hq, hk)
    negated = -inv_freq

    def fwd():
        _rotary_inplace(q, k, position_ids, inv_freq)

    def bwd():
        _rotary_inplace(dq, dk, position_ids, negated)

    def full():
        fwd()
        bwd()

    return {"fwd": fwd, "bwd": bwd, "full": full, "release": lambda: None}


def bench_fused_linear_ce(bench: Bench, shapes: Shapes, liger: dict, dtype: torch.dtype) -> list[Row]:
    from glmwb.kernels.fused_linear_ce import fused_linear_cross_entropy

    n, d, v = shapes.ce_tokens, shapes.hidden, shapes.vocab
    hidden = torch.randn(n, d, device=bench.device, dtype=dtype, requires_grad=True)
    weight = torch.nn.Parameter((torch.randn(v, d, device=bench.device) / math.sqrt(d)).to(dtype))
    labels = torch.randint(0, v, (n,), device=bench.device)
    labels[::10] = -100

    def eager_fn():
        return F.cross_entropy(F.linear(hidden, weight), labels)

    compiled_fn = compiled(eager_fn, bench.dry_run)
    forwards = {
        "eager": eager_fn,
        "compile": compiled_fn,
        "triton": lambda: fused_linear_cross_entropy(hidden, weight, labels),
    }
    lig = "fused_linear_ce" in liger and try_liger("fused_linear_ce", liger["fused_linear_ce"])
    if lig:
        forwards["liger"] = lambda: lig(weight, hidden, labels)
    one = torch.ones((), device=bench.device)
    providers = {k: fwd_bwd_fns(f, [hidden, weight], lambda out: [one]) for k, f in forwards.items()}
    gemm = 2 * n * v * d / 1e12  # TFLOP per GEMM; ours does all three inside its forward
    work = {"fwd": gemm, "bwd": 2 * gemm, "full": 3 * gemm}
    return _rows_for(bench, "fused_linear_ce", n, providers, work, "TFLOP/s",
                     {"triton": "fwd includes the gradient GEMMs; bwd only scales them"})  # fmt: skip


def bench_logprobs(bench: Bench, shapes: Shapes, liger: dict, dtype: torch.dtype) -> list[Row]:
    from glmwb.kernels.logprobs import linear_selective_logprobs

    (b, t), d, v = shapes.logprob_batch, shapes.hidden, shapes.vocab
    hidden = torch.randn(b, t, d, device=bench.device, dtype=dtype, requires_grad=True)
    weight = torch.nn.Parameter((torch.randn(v, d, device=bench.device) / math.sqrt(d)).to(dtype))
    labels = torch.randint(0, v, (b, t), device=bench.device)
    labels[:, : t // 4] = -100  # prompts
    temperature = 0.9

    def eager_fn():  # the usual DPO / PPO code: full logits, fp32 log_softmax, gather
        logits = F.linear(hidden, weight).float() / temperature
        valid = labels != -100
        logp = torch.log_softmax(logits, -1).gather(-1, torch.where(valid, labels, 0)[..., None]).squeeze(-1)
        return logp * valid

    compiled_fn = compiled(eager_fn, bench.dry_run)
    forwards = {
        "eager": eager_fn,
        "compile": compiled_fn,
        "triton": lambda: linear_selective_logprobs(hidden, weight, labels, temperature),
    }
    upstream = torch.randn(b, t, device=bench.device)
    providers = {k: fwd_bwd_fns(f, [hidden, weight], lambda out: [upstream]) for k, f in forwards.items()}
    gemm = 2 * b * t * v * d / 1e12
    work = {"fwd": gemm, "bwd": 2 * gemm, "full": 3 * gemm}
    rows = _rows_for(bench, "logprobs", b * t, providers, work, "TFLOP/s",
                     {"triton": "bwd recomputes the chunk logits (one more GEMM than eager)"})  # fmt: skip
    # Reference-model log-probs: forward only, no graph.
    for provider, fn in forwards.items():
        try:
            with torch.no_grad():
                peak = bench.peak_mb(fn)
                ms = bench.time_ms(fn)
            tflops = gemm / ms * 1e3
            frac = tflops / bench.matmul_tflops if bench.matmul_tflops else None
            rows.append(Row("logprobs", provider, "no_grad", b * t, ms, tflops, "TFLOP/s", frac, peak, ""))
        except torch.OutOfMemoryError:
            rows.append(Row("logprobs", provider, "no_grad", b * t, None, None, "TFLOP/s", None, None, "OOM"))
            torch.cuda.empty_cache()
    return rows


BENCHES = {
    "rmsnorm": bench_rmsnorm,
    "add_rmsnorm": bench_add_rmsnorm,
    "swiglu": bench_swiglu,
    "rotary": bench_rotary,
    "fused_linear_ce": bench_fused_linear_ce,
    "logprobs": bench_logprobs,
}


# ----------------------------------------------------------------------------------------------------------
# Targets (from the kernels issue)


def _get(rows: list[Row], op: str, provider: str, mode: str, tokens: int) -> Row | None:
    for r in rows:
        if (r.op, r.provider, r.mode, r.tokens) == (op, provider, mode, tokens):
            return r
    return None


def ratio_summary(rows: list[Row], bench: Bench, shapes: Shapes) -> list[str]:
    """The side-by-side ratios the CSV supports, one line each, at the large token counts (>= 8,192): the
    fraction of the device's copy bandwidth reached, our time against each baseline's (the slowest of the
    token counts: the claim that holds at all of them), and peak memory against eager. Numbers only: what
    a ratio must reach is a goal of an issue, not of this script."""
    if bench.dry_run or not bench.cuda:
        return ["dry run: no timings to compare (ratios are printed only on a CUDA GPU)"]
    big = [n for n in shapes.tokens if n >= 8192] or list(shapes.tokens)
    lines: list[str] = []

    def line(name: str, values: list[float | None], fmt: str, worst=min) -> None:
        got = [v for v in values if v is not None]
        if not got:
            lines.append(f"{name}: not measured")
            return
        lines.append(
            f"{name}: {fmt.format(worst(got))}"
            + (" (some token counts missing)" if len(got) < len(values) else "")
        )

    def frac(op, mode):
        return [getattr(_get(rows, op, "triton", mode, n), "fraction_of_ceiling", None) for n in big]

    def speedup(op, base, mode, ours="triton", tokens=None):
        out = []
        for n in tokens or big:
            a, b = _get(rows, op, base, mode, n), _get(rows, op, ours, mode, n)
            out.append(a.ms / b.ms if a and b and a.ms and b.ms else None)
        return out

    line("RMSNorm fwd, fraction of copy bandwidth", frac("rmsnorm", "fwd"), "{:.0%}")
    line("RMSNorm bwd, fraction of copy bandwidth", frac("rmsnorm", "bwd"), "{:.0%}")
    for op, label in (("rmsnorm", "RMSNorm fwd+bwd"), ("add_rmsnorm", "fused add+RMSNorm fwd+bwd"),
                      ("swiglu", "SwiGLU fwd+bwd"), ("rotary", "partial rotary fwd+bwd")):  # fmt: skip
        for base in ("eager", "compile", "liger", "separate"):
            if any(r.op == op and r.provider == base for r in rows):
                line(f"{label}, speed-up over {base}", speedup(op, base, "full"), "{:.2f}x")
    for base in ("eager", "compile"):
        line(f"partial rotary in place fwd+bwd, speed-up over {base}",
             speedup("rotary", base, "full", ours="triton_inplace"), "{:.2f}x")  # fmt: skip

    def mem_ratio(op, tokens, mode="full"):
        ours, eager = _get(rows, op, "triton", mode, tokens), _get(rows, op, "eager", mode, tokens)
        if not ours or ours.peak_mem_mb is None or not eager:
            return None
        if eager.note == "OOM":  # eager needs more than the device has: compare with the whole device
            return ours.peak_mem_mb / (torch.cuda.get_device_properties(bench.device).total_memory / 2**20)
        return ours.peak_mem_mb / eager.peak_mem_mb if eager.peak_mem_mb else None

    n_ce = shapes.ce_tokens
    line(
        f"fused linear CE peak memory / eager at {n_ce} tokens",
        [mem_ratio("fused_linear_ce", n_ce)],
        "{:.0%}",
    )
    line(f"fused linear CE time / eager at {n_ce} tokens (fwd+bwd)",
         [1 / s if s else None for s in speedup("fused_linear_ce", "eager", "full", tokens=[n_ce])], "{:.2f}x", max)  # fmt: skip
    n_lp = shapes.logprob_batch[0] * shapes.logprob_batch[1]
    for mode in ("full", "no_grad"):
        line(f"fused log-prob peak memory / eager at {n_lp} tokens ({mode})", [mem_ratio("logprobs", n_lp, mode)],
             "{:.0%}", max)  # fmt: skip
    return lines


# ----------------------------------------------------------------------------------------------------------
# Output


def write_csv(rows: list[Row], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(Row)])
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))


PROVIDER_COLORS = {"eager": "tab:orange", "compile": "tab:blue", "liger": "tab:green", "liger_sep": "tab:olive",
                   "separate": "tab:gray", "triton": "tab:red", "triton_inplace": "tab:purple"}  # fmt: skip


def read_csv(path: Path) -> list[Row]:
    """Rows back from a ``bench_kernels.csv`` (to re-plot a run made elsewhere)."""
    types = {f.name: f.type for f in fields(Row)}
    rows = []
    with path.open() as f:
        for record in csv.DictReader(f):
            values = {}
            for name, text in record.items():
                if name in ("op", "provider", "mode", "unit", "note"):
                    values[name] = text
                elif text in ("", "None"):
                    values[name] = None
                else:
                    values[name] = int(text) if types[name] == "int" else float(text)
            rows.append(Row(**values))
    return rows


def plot(rows: list[Row], path: Path, title: str) -> None:
    """Top: fwd+bwd time per provider (a log-scale line over the token sweep, bars for one size).
    Bottom: peak extra memory of that pass. One colour per provider in every panel; ours is red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [op for op in BENCHES if any(r.op == op for r in rows)]
    n = max(len(ops), 1)
    fig, axes = plt.subplots(2, n, figsize=(3.6 * n, 6.0), squeeze=False)
    for col, op in enumerate(ops):
        op_rows = [r for r in rows if r.op == op and r.mode == "full" and r.ms is not None]
        providers = [p for p in PROVIDER_COLORS if any(r.provider == p for r in op_rows)]
        sizes = sorted({r.tokens for r in op_rows})
        time_ax, mem_ax = axes[0][col], axes[1][col]
        for i, provider in enumerate(providers):
            pts = sorted((r.tokens, r.ms, r.peak_mem_mb or 0.0) for r in op_rows if r.provider == provider)
            color = PROVIDER_COLORS[provider]
            if len(sizes) > 1:
                xs = [p[0] for p in pts]
                time_ax.plot(xs, [p[1] for p in pts], marker="o", color=color, label=provider)
                mem_ax.plot(xs, [p[2] for p in pts], marker="o", color=color, label=provider)
            else:
                time_ax.bar(i, pts[0][1], color=color, label=provider)
                mem_ax.bar(i, pts[0][2], color=color, label=provider)
        if len(sizes) == 1:
            for ax in (time_ax, mem_ax):
                ax.set_xticks(range(len(providers)), providers, rotation=30, fontsize=7)
            time_ax.set_title(f"{op} (fwd+bwd, {sizes[0]} tokens)", fontsize=9)
            time_ax.set_ylabel("ms")
        else:
            time_ax.set_xscale("log", base=2)
            mem_ax.set_xscale("log", base=2)
            mem_ax.set_xlabel("tokens")
            time_ax.set_title(f"{op} (fwd+bwd)", fontsize=9)
            time_ax.set_yscale("log")
            time_ax.set_ylabel("ms (log)")
        mem_ax.set_ylabel("peak extra MiB")
        time_ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", nargs="+", choices=ALL_OPS, default=list(ALL_OPS))
    p.add_argument("--tokens", nargs="+", type=int, default=None, help="token sweep (default 4k..32k)")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--out", type=Path, default=Path("runs/bench_kernels"))
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, CPU interpreter ok, no claims")
    p.add_argument("--no-liger", action="store_true", help="leave the Liger-Kernel columns out")
    p.add_argument("--replot", type=Path, default=None, help="only redraw the plot of this bench_kernels.csv")
    p.add_argument("--title", default=None, help="plot title with --replot")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot is not None:
        out = args.replot.with_suffix(".png")
        plot(read_csv(args.replot), out, args.title or str(args.replot))
        print(f"wrote {out}")
        return 0
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("bench_kernels: needs a CUDA GPU (use --dry-run to check the script on a CPU)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    shapes = DRY_RUN if args.dry_run else GLM4_9B
    if args.tokens:
        shapes = Shapes(**{**asdict(shapes), "tokens": tuple(args.tokens)})
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    # The bwd-only timing replays one retained graph; compiled backwards donate their saved buffers unless
    # told not to, and then refuse retain_graph.
    torch_functorch_config.donated_buffer = False
    bench = Bench(device, args.dry_run)
    bench.measure_ceilings()
    liger = {} if args.no_liger else liger_modules()
    name = torch.cuda.get_device_name(device) if cuda else "CPU (Triton interpreter)"
    print(f"device: {name}; dtype {args.dtype}; dry run: {args.dry_run}")
    if bench.copy_gbps:
        print(
            f"measured ceilings: copy {bench.copy_gbps:.0f} GB/s, bf16 matmul {bench.matmul_tflops:.0f} TFLOP/s"
        )
    print(f"Liger-Kernel: {', '.join(sorted(liger)) or 'not available (columns skipped)'}")

    torch.manual_seed(0)
    rows: list[Row] = []
    failed: list[str] = []
    args.out.mkdir(parents=True, exist_ok=True)
    for op in args.ops:
        try:
            rows += BENCHES[op](bench, shapes, liger, dtype)
        except Exception:  # noqa: BLE001 - one broken op must not lose the others' figures
            traceback.print_exc()
            print(f"  {op}: FAILED (traceback above); going on with the other ops", flush=True)
            failed.append(op)
        if cuda:
            torch.cuda.empty_cache()
        write_csv(rows, args.out / "bench_kernels.csv")  # after every op: a killed run keeps what it had
    ceilings = (
        f"copy {bench.copy_gbps:.0f} GB/s, matmul {bench.matmul_tflops:.0f} TFLOP/s"
        if bench.copy_gbps
        else "dry run"
    )
    plot(rows, args.out / "bench_kernels.png", f"{name}, {args.dtype} ({ceilings})")
    print(f"wrote {args.out / 'bench_kernels.csv'} and {args.out / 'bench_kernels.png'} ({len(rows)} rows)")
    print("ratios (the slowest / largest over the token counts >= 8,192):")
    for line in ratio_summary(rows, bench, shapes):
        print("  " + line)
    if failed:
        print(f"ops that failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
