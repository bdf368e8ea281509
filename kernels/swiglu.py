"""SwiGLU on GLM-4's fused gate-first layout: gate_up (..., 2I) -> up * silu(gate) (..., I).

    gate, up = gate_up.chunk(2, -1)          # gate FIRST, as transformers' GlmMLP
    out      = up * silu(gate),  silu(g) = g * sigmoid(g)

Backward (sigmoid recomputed from gate, nothing but gate_up saved), written into one (..., 2I) tensor in
the same fused layout, so it feeds ``gate_up_proj``'s backward directly:

    d gate = d out * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate)))
    d up   = d out * silu(gate)

All math in fp32, one rounding to the output dtype (plain PyTorch in bf16 rounds silu(gate) first, then
the product). Memory-bound: each program streams a BLOCK_N slice of one row, gate and up halves with
contiguous, vectorised loads; a (rows, I / BLOCK_N) grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from glmwb.kernels._common import cdiv, check_device, check_dtype, next_power_of_2, num_warps_for

_BLOCK_N_MAX = 1024  # 8 elements per thread at 4 warps: 16-byte bf16 vectors


# ----------------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _swiglu_fwd_kernel(
    # pointers
    GATE_UP,
    OUT,
    # strides (rows; the last dim is contiguous)
    stride_in_row,
    stride_out_row,
    # meta
    n_cols,  # I, the width of the output
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    in_row = GATE_UP + row * stride_in_row
    gate = tl.load(in_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(in_row + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    out = up * (gate * tl.sigmoid(gate))
    tl.store(OUT + row * stride_out_row + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    # pointers
    DOUT,
    GATE_UP,
    DGATE_UP,
    # strides (rows; the last dim is contiguous)
    stride_dout_row,
    stride_in_row,
    stride_din_row,
    # meta
    n_cols,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    in_row = GATE_UP + row * stride_in_row
    gate = tl.load(in_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(in_row + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(DOUT + row * stride_dout_row + cols, mask=mask, other=0.0).to(tl.float32)

    sig = tl.sigmoid(gate)
    silu = gate * sig
    dgate = dout * up * sig * (1.0 + gate * (1.0 - sig))
    dup = dout * silu
    din_row = DGATE_UP + row * stride_din_row
    tl.store(din_row + cols, dgate.to(DGATE_UP.dtype.element_ty), mask=mask)
    tl.store(din_row + n_cols + cols, dup.to(DGATE_UP.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Host launchers


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """(..., W) -> (M, W) with a contiguous last dim (a view when the layout allows it)."""
    t = t.reshape(-1, width)
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_config(n_cols: int) -> tuple[int, int]:
    block_n = min(next_power_of_2(n_cols), _BLOCK_N_MAX)
    return block_n, num_warps_for(block_n)


def _check_gate_up(op: str, gate_up: torch.Tensor) -> None:
    check_dtype(op, "gate_up", gate_up)
    if gate_up.dim() < 1:
        raise ValueError(f"{op}: gate_up must have at least one dim (..., 2 * intermediate), got a scalar")
    if gate_up.shape[-1] % 2:
        raise ValueError(
            f"{op}: last dim of gate_up must be even (gate and up halves, gate first), "
            f"got {gate_up.shape[-1]} in shape {tuple(gate_up.shape)}"
        )
    check_device(op, _swiglu_fwd_kernel, gate_up=gate_up)


def _swiglu_fwd(gate_up: torch.Tensor) -> torch.Tensor:
    _check_gate_up("swiglu", gate_up)
    n_cols = gate_up.shape[-1] // 2
    x = _rows(gate_up, 2 * n_cols)  # (M, 2I)
    out = torch.empty((x.shape[0], n_cols), dtype=gate_up.dtype, device=gate_up.device)
    if out.numel() > 0:
        block_n, num_warps = _launch_config(n_cols)
        _swiglu_fwd_kernel[(x.shape[0], cdiv(n_cols, block_n))](
            x, out, x.stride(0), out.stride(0), n_cols, BLOCK_N=block_n, num_warps=num_warps
        )
    return out.view(*gate_up.shape[:-1], n_cols)


def _swiglu_bwd(dout: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    n_cols = gate_up.shape[-1] // 2
    x = _rows(gate_up, 2 * n_cols)
    dout2 = _rows(dout, n_cols)
    dgate_up = torch.empty((x.shape[0], 2 * n_cols), dtype=gate_up.dtype, device=gate_up.device)
    if dgate_up.numel() > 0:
        block_n, num_warps = _launch_config(n_cols)
        _swiglu_bwd_kernel[(x.shape[0], cdiv(n_cols, block_n))](
            dout2, x, dgate_up,
            dout2.stride(0), x.stride(0), dgate_up.stride(0),
            n_cols, BLOCK_N=block_n, num_warps=num_warps,
        )  # fmt: skip
    return dgate_up.view(gate_up.shape)


# ----------------------------------------------------------------------------------------------------------
# PyTorch reference


def swiglu_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """``GlmMLP``'s activation, computed in fp32 and returned in gate_up's dtype."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (up * F.silu(gate)).to(gate_up.dtype)


# ----------------------------------------------------------------------------------------------------------
# Autograd, functional and module forms


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up)
        return _swiglu_fwd(gate_up)

    @staticmethod
    def backward(ctx, dout: torch.Tensor) -> torch.Tensor:
        (gate_up,) = ctx.saved_tensors
        return _swiglu_bwd(dout, gate_up)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton ``up * silu(gate)`` for gate_up (..., 2I), gate first; returns (..., I)."""
    return SwiGLUFunction.apply(gate_up)


class TritonSwiGLU(nn.Module):
    """The activation between ``gate_up_proj`` and ``down_proj``; no parameters."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return swiglu(gate_up)
