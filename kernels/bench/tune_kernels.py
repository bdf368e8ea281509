"""Launch-parameter sweep for the memory-bound kernels (RMSNorm, add + RMSNorm, rotary) on a GPU.

    python -m glmwb.kernels.bench.tune_kernels --out runs/tune            # GLM-4-9B shapes, 8k-32k tokens

Every configuration is first checked against the heuristic default's output (to bf16 rounding: the row
reductions change order with the number of warps; dweight, summed in fp32 partials whose count changes
with the number of programs, to fp32 rounding; unwritten elements are NaN-poisoned), then timed as a CUDA-graph
replay (``Bench.time_ms(graph=True)``, the median over ~100 ms, L2 flushed before each replay), like
``bench_kernels``. It prints the default and the five fastest configurations per op and size, with the
fraction of the copy bandwidth, and writes every row to ``<out>/tune.csv``. The defaults in
``kernels/rmsnorm.py`` and ``kernels/rotary.py`` come from this sweep (docs/kernels.md has the figures).
"""

from __future__ import annotations

import argparse
import csv
import itertools
from pathlib import Path

import torch

from glmwb.kernels.bench.bench_kernels import Bench

EPS = 1.5625e-07


def _check(name: str, got: torch.Tensor, want: torch.Tensor, fp32: bool = False) -> None:
    """got == want to bf16 rounding (fp32=True: to fp32 rounding of a long sum); NaN never passes."""
    rtol, atol = (1e-4, 1e-3) if fp32 else (1.6e-2, 1e-2)
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def sweep_rmsnorm(bench: Bench, tokens: list[int], hidden: int, dtype: torch.dtype) -> list[dict]:
    return [row for n in tokens for row in _rmsnorm_at(bench, n, hidden, dtype)]


def _rmsnorm_at(bench: Bench, n: int, hidden: int, dtype: torch.dtype) -> list[dict]:
    from glmwb.kernels.rmsnorm import _rmsnorm_bwd, _rmsnorm_fwd

    rows = []
    x = torch.randn(n, hidden, device=bench.device, dtype=dtype)
    res = torch.randn_like(x)
    w = torch.rand(hidden, device=bench.device, dtype=dtype) + 0.5
    dy, dres = torch.randn_like(x), torch.randn_like(x)
    floor_bytes = {"fwd": 2 * x.numel() * x.element_size(), "bwd": 3 * x.numel() * x.element_size()}
    floor_bytes["add_fwd"] = floor_bytes["bwd"] + x.numel() * x.element_size()  # x, res -> y, new_res
    floor_bytes["add_bwd"] = floor_bytes["add_fwd"]  # dy, dres, new_res -> dx

    y_ref, _, rstd = _rmsnorm_fwd(x, w, EPS)
    y_add_ref, new_res, rstd_add = _rmsnorm_fwd(x, w, EPS, res)
    dx_ref, dw_ref = _rmsnorm_bwd(dy, x, w, rstd)
    dx_add_ref, dw_add_ref = _rmsnorm_bwd(dy, new_res, w, rstd_add, dres)

    def record(op, cfg, fn, default):
        ms = bench.time_ms(fn, graph=True)
        gbps = floor_bytes[op] / ms / 1e6
        rows.append({"op": f"rmsnorm_{op}", "tokens": n, "config": cfg, "default": default, "ms": ms,
                     "gbps": gbps, "fraction_of_copy": gbps / bench.copy_gbps})  # fmt: skip

    record("fwd", "default", lambda: _rmsnorm_fwd(x, w, EPS), True)
    record("add_fwd", "default", lambda: _rmsnorm_fwd(x, w, EPS, res), True)
    for block_m, warps in itertools.product((1, 2, 4), (4, 8, 16)):
        cfg = f"block_m={block_m} warps={warps}"
        kw = {"block_m": block_m, "num_warps": warps}
        _check(f"fwd {cfg}", _rmsnorm_fwd(x, w, EPS, **kw)[0], y_ref)
        _check(f"add fwd {cfg}", _rmsnorm_fwd(x, w, EPS, res, **kw)[0], y_add_ref)
        record("fwd", cfg, lambda kw=kw: _rmsnorm_fwd(x, w, EPS, **kw), False)
        record("add_fwd", cfg, lambda kw=kw: _rmsnorm_fwd(x, w, EPS, res, **kw), False)

    record("bwd", "default", lambda: _rmsnorm_bwd(dy, x, w, rstd), True)
    record("add_bwd", "default", lambda: _rmsnorm_bwd(dy, new_res, w, rstd_add, dres), True)
    for block_m, warps, per_sm, stages in itertools.product((1, 2), (4, 8, 16), (1, 2, 4, 8), (None, 2, 3)):
        cfg = f"block_m={block_m} warps={warps} per_sm={per_sm} stages={stages}"
        kw = {"block_m": block_m, "num_warps": warps, "programs_per_sm": per_sm, "num_stages": stages}
        try:
            dx, dw = _rmsnorm_bwd(dy, x, w, rstd, **kw)
            _check(f"bwd {cfg}", dx, dx_ref)
            _check(f"bwd dweight {cfg}", dw, dw_ref, fp32=True)
            dx, dw = _rmsnorm_bwd(dy, new_res, w, rstd_add, dres, **kw)
            _check(f"add bwd {cfg}", dx, dx_add_ref)
            _check(f"add bwd dweight {cfg}", dw, dw_add_ref, fp32=True)
        except Exception as error:  # noqa: BLE001 - a config that fails to compile or check is reported
            print(f"  SKIPPED rmsnorm bwd {cfg}: {type(error).__name__}: {str(error)[:300]}")
            continue
        record("bwd", cfg, lambda kw=kw: _rmsnorm_bwd(dy, x, w, rstd, **kw), False)
        record("add_bwd", cfg, lambda kw=kw: _rmsnorm_bwd(dy, new_res, w, rstd_add, dres, **kw), False)
    return rows


def sweep_rotary(
    bench: Bench, tokens: list[int], hq: int, hk: int, hd: int, dtype: torch.dtype
) -> list[dict]:
    return [row for n in tokens for row in _rotary_at(bench, n, hq, hk, hd, dtype)]


def _rotary_at(bench: Bench, n: int, hq: int, hk: int, hd: int, dtype: torch.dtype) -> list[dict]:
    from glmwb.kernels.rotary import _launch, _qk_views, rotary_inv_freq

    rows = []
    inv_freq = rotary_inv_freq(hd // 2, 10000.0, device=bench.device)
    batch, seq = max(1, n // 4096), min(n, 4096)
    position_ids = torch.arange(seq, device=bench.device)[None].expand(batch, seq)
    qkv = torch.randn(batch * seq, (hq + 2 * hk) * hd, device=bench.device, dtype=dtype)
    q, k = _qk_views(qkv, position_ids, hq, hk)
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    elem = qkv.element_size()
    layouts = {  # name: (extent, out, bytes moved)
        "rotary_inplace": (hd // 2, (q, k), 2 * n * (hq + hk) * (hd // 2) * elem),
        "rotary": (hd, (q_out, k_out), 2 * n * (hq + hk) * hd * elem),
    }
    base = qkv.clone()
    for op, (extent, (qo, ko), nbytes) in layouts.items():

        def run(extent=extent, qo=qo, ko=ko, **kw):
            _launch(q, k, qo, ko, position_ids, inv_freq, extent, **kw)

        qkv.copy_(base)
        run()
        want = (qo.clone(), ko.clone())
        for cfg, kw in [("default", {})] + [
            (f"block_t={bt} warps={w}", {"block_t": bt, "num_warps": w})
            for bt, w in itertools.product((1, 2, 4, 8), (1, 2, 4, 8, 16))
        ]:
            qkv.copy_(base)
            if op == "rotary":
                q_out.fill_(float("nan"))
                k_out.fill_(float("nan"))
            try:
                run(**kw)
                _check(f"{op} {cfg} q", qo, want[0])
                _check(f"{op} {cfg} k", ko, want[1])
                if not torch.equal(qo, want[0]) or not torch.equal(ko, want[1]):
                    print(f"  note: {op} {cfg} is not bitwise equal to the default (within bf16 rounding)")
            except Exception as error:  # noqa: BLE001 - reported, the sweep goes on
                print(f"  SKIPPED {op} {cfg}: {type(error).__name__}: {str(error)[:300]}")
                continue
            ms = bench.time_ms(lambda kw=kw: run(**kw), graph=True)
            gbps = nbytes / ms / 1e6
            rows.append({"op": op, "tokens": n, "config": cfg, "default": not kw, "ms": ms, "gbps": gbps,
                         "fraction_of_copy": gbps / bench.copy_gbps})  # fmt: skip
    return rows


def report(rows: list[dict]) -> None:
    for (op, n), group in itertools.groupby(rows, key=lambda r: (r["op"], r["tokens"])):
        group = list(group)
        default = next(r for r in group if r["default"])
        best = sorted(group, key=lambda r: r["ms"])[:5]
        print(
            f"\n{op}, {n} tokens: default {default['ms'] * 1e3:.1f} us ({default['fraction_of_copy']:.0%} of copy)"
        )
        for r in best:
            print(
                f"  {r['ms'] * 1e3:8.1f} us  {r['fraction_of_copy']:5.0%}  {default['ms'] / r['ms']:.3f}x  {r['config']}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--ops", nargs="+", default=["rmsnorm", "rotary"], choices=["rmsnorm", "rotary"])
    parser.add_argument("--out", type=Path, default=Path("runs/tune"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("the sweep times CUDA graphs: it needs a GPU")
    bench = Bench(torch.device("cuda"), dry_run=False)
    bench.measure_ceilings()
    print(f"{torch.cuda.get_device_name(0)}: copy {bench.copy_gbps:.0f} GB/s")
    rows = []
    if "rmsnorm" in args.ops:
        rows += sweep_rmsnorm(bench, args.tokens, 4096, torch.bfloat16)
    if "rotary" in args.ops:
        rows += sweep_rotary(bench, args.tokens, 32, 2, 128, torch.bfloat16)
    rows.sort(key=lambda r: (r["op"], r["tokens"]))
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "tune.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    report(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
