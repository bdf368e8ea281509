"""Selective log-probabilities: log softmax(logits / T) at the label of each row, and optionally the row's
entropy, without an (N, V) fp32 copy of the logits (DPO, PPO, reference-model log-probs).

    z_r    = x_r / T                       (T = sampling temperature; PPO scores at the rollout's T)
    lse_r  = logsumexp(z_r)
    logp_r = z_r[y_r] - lse_r
    H_r    = -sum_j p_rj log p_rj = lse_r - sum_j p_rj z_rj,      p_r = softmax(z_r)

Rows whose label is ``ignore_index`` (-100: prompt and padding positions) get logp = 0 and H = 0, and no
gradient. Outputs are fp32 (N,) (log-prob differences such as PPO's ratio exp(logp - old_logp) want fp32).

Backward, for upstream gradients a_r = d/d logp_r and c_r = d/d H_r:

    d x_rj = (a_r ([j = y_r] - p_rj) - c_r p_rj (z_rj - lse_r + H_r)) / T

Two entry points:

- ``selective_logprobs(logits, labels)``: logits (..., V) given. The forward kernel makes one online pass over
  each row (running max, sum of exp, and sum of exp * z for the entropy); the backward kernel makes one pass
  that writes d logits (in the logits' dtype). Saved for backward: the logits (already alive) and
  two fp32 numbers per row.
- ``linear_selective_logprobs(hidden, weight, labels)``: the LM head is applied chunk by chunk (rows x V
  logits at a time, as ``kernels/fused_linear_ce.py``), so the full logits never exist. The backward cannot be
  folded into the forward (it depends on per-row upstream gradients), so it recomputes each chunk's logits,
  overwrites them in place with their gradient (the same backward kernel) and applies the two GEMMs.
  Under ``torch.no_grad`` (reference log-probs) it is a forward pass only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from glmwb.kernels._common import check_device, check_dtype, num_warps_for
from glmwb.kernels.fused_linear_ce import (
    IGNORE_INDEX,
    ChunkedLMHead,
    accumulate_matmul,
    block_v_for,
    check_labels,
    default_chunk_size,
)

# ----------------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _logprobs_fwd_kernel(
    # pointers
    LOGITS,  # (N, V)
    LABELS,  # (N,) integer
    LOGP,  # (N,) fp32
    ENTROPY,  # (N,) fp32, written when RETURN_ENTROPY
    LSE,  # (N,) fp32: logsumexp(z) for the backward
    # strides (rows; the last dim is contiguous)
    stride_logits_row,
    # meta
    n_cols,
    ignore_index,
    inv_temperature,
    RETURN_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS + row * stride_logits_row
    label = tl.load(LABELS + row).to(tl.int64)
    if label == ignore_index:
        tl.store(LOGP + row, 0.0)
        tl.store(LSE + row, 0.0)
        if RETURN_ENTROPY:
            tl.store(ENTROPY + row, 0.0)
        return

    # One online pass: m = running max of z, d = sum exp(z - m), s = sum exp(z - m) z (both rescaled as m grows).
    offsets = tl.arange(0, BLOCK_V)
    m = float("-inf")
    d = 0.0
    s = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offsets
        mask = cols < n_cols
        z = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new)  # 0 on masked columns
        d = d * alpha + tl.sum(e, axis=0)
        if RETURN_ENTROPY:
            s = s * alpha + tl.sum(e * tl.where(mask, z, 0.0), axis=0)  # no 0 * -inf on masked columns
        m = m_new
    lse = m + tl.log(d)
    z_label = tl.load(row_ptr + label).to(tl.float32) * inv_temperature
    tl.store(LOGP + row, z_label - lse)
    tl.store(LSE + row, lse)
    if RETURN_ENTROPY:
        tl.store(ENTROPY + row, lse - s / d)


@triton.jit
def _logprobs_bwd_kernel(
    # pointers
    LOGITS,  # (N, V): read
    DLOGITS,  # (N, V): written; may be LOGITS itself (in place, the chunked linear form)
    LABELS,
    LSE,
    ENTROPY,  # read when HAS_DENTROPY
    DLOGP,  # (N,) upstream gradient of logp
    DENTROPY,  # (N,) upstream gradient of the entropy, when HAS_DENTROPY
    # strides (rows; the last dim is contiguous)
    stride_logits_row,
    stride_dlogits_row,
    # meta
    n_cols,
    ignore_index,
    inv_temperature,
    HAS_DENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS + row * stride_logits_row
    drow_ptr = DLOGITS + row * stride_dlogits_row
    label = tl.load(LABELS + row).to(tl.int64)
    offsets = tl.arange(0, BLOCK_V)
    if label == ignore_index:
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offsets
            zero = tl.zeros((BLOCK_V,), tl.float32).to(DLOGITS.dtype.element_ty)
            tl.store(drow_ptr + cols, zero, mask=cols < n_cols)
        return

    lse = tl.load(LSE + row)
    a = tl.load(DLOGP + row).to(tl.float32) * inv_temperature
    if HAS_DENTROPY:
        c = tl.load(DENTROPY + row).to(tl.float32) * inv_temperature
        shift = tl.load(ENTROPY + row) - lse  # H - lse = -sum p z
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offsets
        mask = cols < n_cols
        z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32) * inv_temperature
        p = tl.exp(z - lse)
        grad = tl.where(cols == label, a, 0.0) - a * p
        if HAS_DENTROPY:
            grad -= c * p * (z + shift)
        tl.store(drow_ptr + cols, grad.to(DLOGITS.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Host launchers


def _check_temperature(op: str, temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"{op}: temperature must be > 0, got {temperature}")


def _launch_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    logp: torch.Tensor,
    entropy: torch.Tensor | None,
    lse: torch.Tensor,
    ignore_index: int,
    temperature: float,
) -> None:
    """Fill logp / entropy / lse (fp32 (n,) views) from logits (n, V) with a contiguous last dim."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    block_v = block_v_for(n_cols, _logprobs_fwd_kernel)
    _logprobs_fwd_kernel[(n_rows,)](
        logits, labels, logp, entropy if entropy is not None else logp, lse,
        logits.stride(0),
        n_cols, ignore_index, 1.0 / temperature,
        RETURN_ENTROPY=entropy is not None, BLOCK_V=block_v, num_warps=num_warps_for(block_v),
    )  # fmt: skip


def _launch_bwd(
    logits: torch.Tensor,
    dlogits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    dlogp: torch.Tensor,
    dentropy: torch.Tensor | None,
    ignore_index: int,
    temperature: float,
) -> None:
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    block_v = block_v_for(n_cols, _logprobs_bwd_kernel)
    has_dentropy = dentropy is not None
    _logprobs_bwd_kernel[(n_rows,)](
        logits, dlogits, labels, lse, entropy if has_dentropy else lse, dlogp,
        dentropy if has_dentropy else dlogp,
        logits.stride(0), dlogits.stride(0),
        n_cols, ignore_index, 1.0 / temperature,
        HAS_DENTROPY=has_dentropy, BLOCK_V=block_v, num_warps=num_warps_for(block_v),
    )  # fmt: skip


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    t = t.reshape(-1, width)
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_logits_inputs(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> None:
    op = "selective_logprobs"
    check_dtype(op, "logits", logits)
    if logits.dim() < 1:
        raise ValueError(f"{op}: logits must be (..., V), got a scalar")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"{op}: labels shape {tuple(labels.shape)} must equal logits' leading dims {tuple(logits.shape[:-1])}"
        )
    _check_temperature(op, temperature)
    check_device(op, _logprobs_fwd_kernel, logits=logits, labels=labels)


def _selective_logprobs_fwd(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, return_entropy: bool, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Return (logp (N,), entropy (N,) or None, lse (N,)), all fp32, for logits (..., V) flattened to rows."""
    _check_logits_inputs(logits, labels, temperature)
    vocab_size = logits.shape[-1]
    logits2 = _rows(logits, vocab_size)
    labels = labels.reshape(-1).contiguous()
    check_labels("selective_logprobs", labels, logits2.shape[0], vocab_size, ignore_index)
    n_rows = logits2.shape[0]
    logp = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if return_entropy else None
    _launch_fwd(logits2, labels, logp, entropy, lse, ignore_index, temperature)
    return logp, entropy, lse


def _check_linear_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    chunk_size: int | None,
) -> None:
    op = "linear_selective_logprobs"
    check_dtype(op, "hidden", hidden)
    check_dtype(op, "weight", weight)
    if hidden.dim() != 2:
        raise ValueError(f"{op}: hidden must be (N, D), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"{op}: weight must be (V, D) with D = hidden's last dim ({hidden.shape[1]}), "
            f"got shape {tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{op}: hidden ({hidden.dtype}) and weight ({weight.dtype}) must have one dtype")
    tensors = {"hidden": hidden, "weight": weight, "labels": labels}
    if bias is not None:
        if bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype:
            raise ValueError(
                f"{op}: bias must be (V,) = ({weight.shape[0]},) in weight's dtype {weight.dtype}, "
                f"got {bias.dtype} of shape {tuple(bias.shape)}"
            )
        tensors["bias"] = bias
    _check_temperature(op, temperature)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be >= 1, got {chunk_size}")
    check_device(op, _logprobs_fwd_kernel, **tensors)


def _linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    return_entropy: bool,
    ignore_index: int,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    n_rows = hidden.shape[0]
    logp = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if return_entropy else None
    head = ChunkedLMHead(hidden, weight, bias)
    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        logits = head.logits(start, end)  # (n, V), fp32 where that is free (see ChunkedLMHead)
        _launch_fwd(
            logits, labels[start:end], logp[start:end], entropy[start:end] if return_entropy else None,
            lse[start:end], ignore_index, temperature,
        )  # fmt: skip
    return logp, entropy, lse


def _linear_logprobs_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    dlogp: torch.Tensor,
    dentropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    chunk: int,
    grads: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    need_dh, need_dw, need_db = grads
    n_rows = hidden.shape[0]
    d_hidden = torch.empty_like(hidden) if need_dh else None
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
    d_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_db else None
    head = ChunkedLMHead(hidden, weight, bias)
    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        logits = head.logits(start, end)  # recomputed: (n, V)
        grad_logits = head.grad_buffer(logits)  # (n, V) in the inputs' dtype, over the logits when it can be
        _launch_bwd(
            logits, grad_logits, labels[start:end], lse[start:end],
            entropy[start:end] if dentropy is not None else None, dlogp[start:end],
            dentropy[start:end] if dentropy is not None else None, ignore_index, temperature,
        )  # fmt: skip
        if need_dh:
            torch.mm(grad_logits, weight, out=d_hidden[start:end])
        if need_dw:
            accumulate_matmul(d_weight, grad_logits.t(), hidden[start:end])
        if need_db:
            d_bias += grad_logits.sum(0, dtype=torch.float32)
    if d_weight is not None:
        d_weight = d_weight.to(weight.dtype)
    if d_bias is not None:
        d_bias = d_bias.to(bias.dtype)
    return d_hidden, d_weight, d_bias


# ----------------------------------------------------------------------------------------------------------
# PyTorch reference


def selective_logprobs_ref(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Full fp32 log_softmax(logits / T), gathered at the labels; (log-probs, entropies) fp32, 0 where ignored."""
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)  # (..., V) fp32
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    logp = logprobs.gather(-1, safe[..., None]).squeeze(-1) * valid
    if not return_entropy:
        return logp
    entropy = -(logprobs.exp() * logprobs).sum(-1) * valid
    return logp, entropy


def linear_selective_logprobs_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``selective_logprobs_ref`` of the fp32 logits hidden @ weight.T (+ bias)."""
    logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    return selective_logprobs_ref(logits, labels, temperature, return_entropy, ignore_index)


# ----------------------------------------------------------------------------------------------------------
# Autograd


class SelectiveLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        labels: torch.Tensor,
        temperature: float,
        return_entropy: bool,
        ignore_index: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logp, entropy, lse = _selective_logprobs_fwd(
            logits, labels, temperature, return_entropy, ignore_index
        )
        if entropy is None:
            entropy = logp.new_empty(0)
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        ctx.set_materialize_grads(False)
        shape = logits.shape[:-1]
        return logp.view(shape), entropy.view(shape) if return_entropy else entropy

    @staticmethod
    def backward(ctx, dlogp: torch.Tensor | None, dentropy: torch.Tensor | None):
        logits, labels, lse, entropy = ctx.saved_tensors
        if dlogp is None and dentropy is None:
            return None, None, None, None, None
        vocab_size = logits.shape[-1]
        logits2 = _rows(logits, vocab_size)
        n_rows = logits2.shape[0]
        dlogp = (dlogp if dlogp is not None else lse.new_zeros(n_rows)).reshape(-1).contiguous()
        if dentropy is not None:
            dentropy = dentropy.reshape(-1).contiguous()
        dlogits = torch.empty((n_rows, vocab_size), dtype=logits.dtype, device=logits.device)
        _launch_bwd(
            logits2, dlogits, labels.reshape(-1).contiguous(), lse, entropy if dentropy is not None else None,
            dlogp, dentropy, ctx.ignore_index, ctx.temperature,
        )  # fmt: skip
        return dlogits.view(logits.shape), None, None, None, None


class LinearSelectiveLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None,
        temperature: float,
        return_entropy: bool,
        ignore_index: int,
        chunk_size: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_linear_inputs(hidden, weight, labels, bias, temperature, chunk_size)
        labels = labels.reshape(-1).contiguous()
        check_labels("linear_selective_logprobs", labels, hidden.shape[0], weight.shape[0], ignore_index)
        chunk = chunk_size or default_chunk_size(hidden.shape[0], hidden.shape[1], weight.shape[0])
        logp, entropy, lse = _linear_logprobs_fwd(
            hidden, weight, labels, bias, temperature, return_entropy, ignore_index, chunk
        )
        if entropy is None:
            entropy = logp.new_empty(0)
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(hidden, weight, labels, bias, lse, entropy)
        ctx.temperature, ctx.ignore_index, ctx.chunk = temperature, ignore_index, chunk
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, dlogp: torch.Tensor | None, dentropy: torch.Tensor | None):
        hidden, weight, labels, bias, lse, entropy = ctx.saved_tensors
        grads = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[3],
        )
        if (dlogp is None and dentropy is None) or not any(grads):
            return None, None, None, None, None, None, None, None
        dlogp = (dlogp if dlogp is not None else lse.new_zeros(lse.shape)).contiguous()
        dentropy = dentropy.contiguous() if dentropy is not None else None
        d_hidden, d_weight, d_bias = _linear_logprobs_bwd(
            hidden, weight, labels, bias, lse, entropy, dlogp, dentropy, ctx.temperature, ctx.ignore_index,
            ctx.chunk, grads,
        )  # fmt: skip
        return d_hidden, d_weight, None, d_bias, None, None, None, None


# ----------------------------------------------------------------------------------------------------------
# Functional and module forms


def selective_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits / T) at labels: logits (..., V), labels (...) -> fp32 (...); with
    ``return_entropy`` also the fp32 entropy of each row. Ignored rows (label -100) give 0 and no gradient."""
    logp, entropy = SelectiveLogprobsFunction.apply(
        logits, labels, float(temperature), return_entropy, ignore_index
    )
    return (logp, entropy) if return_entropy else logp


def linear_selective_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``selective_logprobs(hidden @ weight.T + bias, labels, ...)`` in row chunks, never the full logits.

    hidden (..., D), weight (V, D), labels (...); returns fp32 (...) (and the entropies). Gradients reach
    hidden, weight and bias. Under autocast, the inputs are cast to the autocast dtype first (as ``F.linear``).
    """
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"linear_selective_logprobs: labels shape {tuple(labels.shape)} must equal hidden's leading dims "
            f"{tuple(hidden.shape[:-1])}"
        )
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    shape = hidden.shape[:-1]
    with torch.autocast(device_type, enabled=False):
        logp, entropy = LinearSelectiveLogprobsFunction.apply(
            hidden.reshape(-1, hidden.shape[-1]), weight, labels, bias, float(temperature), return_entropy,
            ignore_index, chunk_size,
        )  # fmt: skip
    return (logp.view(shape), entropy.view(shape)) if return_entropy else logp.view(shape)


class SelectiveLogprobs(nn.Module):
    """``SelectiveLogprobs(temperature)(logits, labels)`` or, with ``weight``, the chunked linear form:
    ``(hidden, labels, weight=lm_head.weight)``."""

    def __init__(
        self, temperature: float = 1.0, return_entropy: bool = False, ignore_index: int = IGNORE_INDEX
    ):
        super().__init__()
        _check_temperature("SelectiveLogprobs", temperature)
        self.temperature, self.return_entropy, self.ignore_index = temperature, return_entropy, ignore_index

    def forward(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if weight is None:
            return selective_logprobs(
                inputs, labels, self.temperature, self.return_entropy, self.ignore_index
            )
        return linear_selective_logprobs(
            inputs,
            weight,
            labels,
            self.temperature,
            self.return_entropy,
            bias=bias,
            ignore_index=self.ignore_index,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, return_entropy={self.return_entropy}"
