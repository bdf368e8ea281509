"""RMSNorm, and residual-add + RMSNorm fused, as GLM-4 computes it (``transformers``' ``GlmRMSNorm``).

    y = weight * round_x(x * rstd),   rstd = 1 / sqrt(mean(x^2) + eps)   (mean, rstd in fp32)

``round_x`` rounds to x's dtype before the weight multiply, exactly as ``GlmRMSNorm`` does
(``weight * hidden_states.to(input_dtype)``); the output dtype is ``promote(x.dtype, weight.dtype)``,
so bf16 x with bf16 weight gives the same bits as the Hugging Face module. GLM-4's eps is 1.5625e-07.

Fused form: ``rmsnorm_add(x, residual, weight, eps) -> (rmsnorm(x + residual), x + residual)``, the
pre-norm block's "add the sublayer output to the residual stream, then norm it" in one pass over the
row (the sum is rounded to x's dtype first, as the unfused code stores it).

Backward, with x_hat = x * rstd in fp32 and g = dy * weight:

    dx      = rstd * (g - x_hat * mean(g * x_hat))      (+ d new_residual in the fused form)
    dweight = sum over rows of dy * round_x(x_hat)

The rounding is treated as the identity in dx (as autograd does through ``.to``). dweight never uses
atomics: a persistent grid of a few programs per SM each walks a contiguous band of rows, keeps its
partial sum in fp32 registers and writes one row of a (programs, N) fp32 buffer, summed on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from glmwb.kernels._common import (
    cdiv,
    check_device,
    check_dtype,
    next_power_of_2,
    num_persistent_programs,
    num_warps_for,
)

GLM_RMS_NORM_EPS = 1.5625e-07
MAX_HIDDEN = 65536  # one row is held in registers; wider rows would need a two-pass kernel
_TILE_ELEMS = 4096  # rows per program are batched up to this many elements (small hidden sizes)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _rmsnorm_fwd_kernel(
    # pointers
    X,
    RESIDUAL,
    W,
    Y,
    RESIDUAL_OUT,
    RSTD,
    # strides (rows; the last dim is contiguous)
    stride_x_row,
    stride_res_row,
    stride_y_row,
    stride_res_out_row,
    # meta
    n_rows,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One program normalises BLOCK_M whole rows (BLOCK_M = 1 at GLM sizes): a single read of x.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]  # (BLOCK_M, BLOCK_N)

    x = tl.load(X + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(RESIDUAL + rows[:, None] * stride_res_row + cols[None, :], mask=mask, other=0.0)
        # Round the sum to x's dtype first: the norm sees exactly the residual stream it returns.
        x = (x.to(tl.float32) + res.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(RESIDUAL_OUT + rows[:, None] * stride_res_out_row + cols[None, :], x, mask=mask)
    x = x.to(tl.float32)

    var = tl.sum(x * x, axis=1) / n_cols  # (BLOCK_M,) fp32
    rstd = tl.rsqrt(var + eps)
    tl.store(RSTD + rows, rstd, mask=row_mask)

    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)  # (BLOCK_N,)
    x_hat = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)  # GlmRMSNorm's .to(input_dtype)
    y = x_hat * w[None, :]
    tl.store(Y + rows[:, None] * stride_y_row + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_bwd_kernel(
    # pointers
    DY,
    X,
    W,
    RSTD,
    DRESIDUAL,
    DX,
    DW_PARTIAL,
    # strides (rows; the last dim is contiguous)
    stride_dy_row,
    stride_x_row,
    stride_dres_row,
    stride_dx_row,
    # meta
    n_rows,
    n_cols,
    rows_per_program,
    HAS_DRESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    # Persistent: program p owns rows [p * rows_per_program, (p + 1) * rows_per_program) and keeps its
    # share of dweight in registers, written once at the end (no atomics, deterministic).
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)  # (BLOCK_N,)
    dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # NUM_STAGES > 1 asks Triton to issue the next rows' loads before this row's math (software pipelining);
    # None is a plain range loop.
    for row0 in tl.range(row_start, row_end, BLOCK_M, num_stages=NUM_STAGES):
        rows = row0 + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(X + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)  # (BLOCK_M,)

        x_hat = x * rstd[:, None]
        # dweight multiplies what the forward multiplied: x_hat rounded to x's dtype.
        dw_acc += dy * x_hat.to(X.dtype.element_ty).to(tl.float32)
        g = dy * w[None, :]
        c = tl.sum(g * x_hat, axis=1) / n_cols  # (BLOCK_M,)
        dx = (g - x_hat * c[:, None]) * rstd[:, None]
        if HAS_DRESIDUAL:
            dres = tl.load(DRESIDUAL + rows[:, None] * stride_dres_row + cols[None, :], mask=mask, other=0.0)
            dx += dres.to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dx_row + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)

    tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_mask)


# ----------------------------------------------------------------------------------------------------------
# Host launchers


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """(..., N) -> (M, N) with a contiguous last dim (a view when the layout allows it)."""
    t = t.reshape(-1, n_cols)
    return t if t.stride(-1) == 1 else t.contiguous()


def _tile(n_cols: int, block_m: int | None = None, num_warps: int | None = None) -> tuple[int, int, int]:
    block_n = next_power_of_2(n_cols)
    block_m = block_m or min(16, max(1, _TILE_ELEMS // block_n))
    return block_m, block_n, num_warps or num_warps_for(block_m * block_n)


def _check_inputs(op: str, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    check_dtype(op, "x", x)
    check_dtype(op, "weight", weight)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dim (..., hidden), got a scalar")
    if weight.dim() != 1:
        raise ValueError(f"{op}: weight must be 1-D (hidden,), got shape {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"{op}: last dim of x ({x.shape[-1]}) must equal the size of weight ({weight.shape[0]}); "
            f"x is {tuple(x.shape)}"
        )
    if x.shape[-1] > MAX_HIDDEN:
        raise ValueError(f"{op}: hidden size {x.shape[-1]} exceeds the single-pass limit {MAX_HIDDEN}")
    tensors = {"x": x, "weight": weight}
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(
                f"{op}: residual shape {tuple(residual.shape)} must equal x shape {tuple(x.shape)}"
            )
        if residual.dtype != x.dtype:
            raise ValueError(f"{op}: residual dtype {residual.dtype} must equal x dtype {x.dtype}")
        tensors["residual"] = residual
    check_device(op, _rmsnorm_fwd_kernel, **tensors)


def _rmsnorm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Return (y, residual_out or None, rstd); y and residual_out have x's shape, rstd is (M,) fp32.
    block_m / num_warps override the launch heuristics (``kernels.bench.tune_kernels`` sweeps them)."""
    op = "rmsnorm" if residual is None else "rmsnorm_add"
    _check_inputs(op, x, weight, residual)
    n_cols = x.shape[-1]
    x2 = _rows(x, n_cols)  # (M, N)
    n_rows = x2.shape[0]
    weight = weight.contiguous()
    y = torch.empty((n_rows, n_cols), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if residual is not None:
        res2 = _rows(residual, n_cols)
        res_out = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    else:
        res2 = res_out = x2  # unused: HAS_RESIDUAL is off
    if n_rows > 0:
        block_m, block_n, num_warps = _tile(n_cols, block_m, num_warps)
        _rmsnorm_fwd_kernel[(cdiv(n_rows, block_m),)](
            x2, res2, weight, y, res_out, rstd,
            x2.stride(0), res2.stride(0), y.stride(0), res_out.stride(0),
            n_rows, n_cols, eps,
            HAS_RESIDUAL=residual is not None, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=num_warps,
        )  # fmt: skip
    y = y.view(*x.shape[:-1], n_cols)
    res_out = res_out.view(x.shape) if residual is not None else None
    return y, res_out, rstd


def _rmsnorm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dresidual: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    num_warps: int | None = None,
    programs_per_sm: int = 2,
    num_stages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (dx, dweight); dx has x's shape and dtype (it already includes dresidual when given).
    The keyword arguments override the launch heuristics (``kernels.bench.tune_kernels`` sweeps them)."""
    n_cols = x.shape[-1]
    x2 = _rows(x, n_cols)
    dy2 = _rows(dy, n_cols)
    n_rows = x2.shape[0]
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return dx.view(x.shape), torch.zeros_like(weight)
    dres2 = _rows(dresidual, n_cols) if dresidual is not None else dy2
    block_m, block_n, num_warps = _tile(n_cols, block_m, num_warps)
    programs = min(cdiv(n_rows, block_m), num_persistent_programs(x.device, programs_per_sm))
    rows_per_program = cdiv(cdiv(n_rows, programs), block_m) * block_m
    programs = cdiv(n_rows, rows_per_program)
    # Every program owns at least one row and writes its row of partial sums, so no memset.
    dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x.device)
    _rmsnorm_bwd_kernel[(programs,)](
        dy2, x2, weight.contiguous(), rstd, dres2, dx, dw_partial,
        dy2.stride(0), x2.stride(0), dres2.stride(0), dx.stride(0),
        n_rows, n_cols, rows_per_program,
        HAS_DRESIDUAL=dresidual is not None, BLOCK_M=block_m, BLOCK_N=block_n, NUM_STAGES=num_stages,
        num_warps=num_warps,
    )  # fmt: skip
    dweight = dw_partial.sum(0).to(weight.dtype)  # (N,): the second pass of the reduction
    return dx.view(x.shape), dweight


# ----------------------------------------------------------------------------------------------------------
# PyTorch references (fp32 math, the rounding points of GlmRMSNorm)


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = GLM_RMS_NORM_EPS) -> torch.Tensor:
    """``GlmRMSNorm``: fp32 variance, x_hat rounded to x's dtype, times weight; dtype promote(x, weight)."""
    x32 = x.float()
    x_hat = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (weight.float() * x_hat.float()).to(torch.promote_types(x.dtype, weight.dtype))


def rmsnorm_add_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = GLM_RMS_NORM_EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm_ref(x + residual), x + residual), the sum rounded to x's dtype."""
    new_residual = (x.float() + residual.float()).to(x.dtype)
    return rmsnorm_ref(new_residual, weight, eps), new_residual


# ----------------------------------------------------------------------------------------------------------
# Autograd


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, _, rstd = _rmsnorm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = _rmsnorm_bwd(dy, x, weight, rstd)
        return dx, dweight, None


class RMSNormAddFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y, new_residual, rstd = _rmsnorm_fwd(x, weight, eps, residual)
        ctx.save_for_backward(new_residual, weight, rstd)
        ctx.set_materialize_grads(False)
        return y, new_residual

    @staticmethod
    def backward(ctx, dy: torch.Tensor | None, dnew_residual: torch.Tensor | None):
        new_residual, weight, rstd = ctx.saved_tensors
        if dy is None:  # only the residual stream was used: the sum passes its gradient through
            return dnew_residual, dnew_residual, torch.zeros_like(weight), None
        dsum, dweight = _rmsnorm_bwd(dy, new_residual, weight, rstd, dnew_residual)
        # d(x + residual) reaches x and residual alike; autograd copies before accumulating in place.
        return dsum, dsum, dweight, None


# ----------------------------------------------------------------------------------------------------------
# Functional and module forms


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = GLM_RMS_NORM_EPS) -> torch.Tensor:
    """Triton RMSNorm of x (..., N) with weight (N,); see the module docstring for the exact formula."""
    return RMSNormFunction.apply(x, weight, eps)


def rmsnorm_add(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = GLM_RMS_NORM_EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (rmsnorm(x + residual), x + residual) from one pass over the rows, with backward."""
    return RMSNormAddFunction.apply(x, residual, weight, eps)


class TritonRMSNorm(nn.Module):
    """Drop-in for the model's ``RMSNorm`` and ``GlmRMSNorm``: the same ``weight`` parameter.

    ``forward(x)`` returns the norm; ``forward(x, residual)`` returns ``(norm(x + residual), x + residual)``.
    """

    def __init__(self, dim: int, eps: float = GLM_RMS_NORM_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    @classmethod
    def from_module(cls, norm: nn.Module) -> TritonRMSNorm:
        """Wrap an existing norm (ours: ``eps``; Hugging Face: ``variance_epsilon``), sharing its weight."""
        eps = getattr(norm, "eps", None)
        if eps is None:
            eps = norm.variance_epsilon
        new = cls(norm.weight.shape[0], eps)
        new.weight = norm.weight
        return new

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return rmsnorm(x, self.weight, self.eps)
        return rmsnorm_add(x, residual, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"
