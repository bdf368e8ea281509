"""Fused linear + cross-entropy: the LM head and its loss without ever holding the (N, V) logits.

    z_r   = h_r W^T (+ b)                                  (N, V) — built CHUNK rows at a time
    lse_r = logsumexp(z_r)
    loss_r = lse_r - (1 - eps) z_r[y_r] - (eps / V) sum_j z_rj  +  w_z lse_r^2      (rows with y_r != ignore)
    loss  = sum_r loss_r / n_valid   (reduction "mean", n_valid = rows not ignored)   or   sum_r loss_r ("sum")

eps is the label smoothing of ``F.cross_entropy`` and w_z the z-loss weight (PaLM: 1e-4). Gradient per row:

    d loss / d z_rj = scale * (p_rj (1 + 2 w_z lse_r) - (1 - eps) [j = y_r] - eps / V),   p = softmax(z_r)

Liger-Kernel's scheme: for each chunk of rows, one GEMM makes the chunk's logits, then
``_fused_linear_ce_fwd_kernel`` (one program per row) makes one online-softmax pass over the row (running max
and sum of exponentials, plus sum z for smoothing) for the loss, and a second pass that writes the gradient
above over the logits (in place when the logits are in the inputs' dtype). Two more GEMMs turn it into this
chunk's rows of d hidden (``g @ W``) and its share of d weight (``g^T h``), all inside the forward; the
backward only multiplies the stored gradients by the incoming scalar. Nothing is recomputed and nothing
(N, V) exists: with the default chunk (~ 2 N D / V rows, so the chunk's logits are about twice the size of
the hidden input) the extra memory is d hidden (N, D), d weight (V, D) in fp32 and one chunk of logits.

Precision (``ChunkedLMHead``): with bf16 / fp16 inputs the chunk's logits are fp32 outputs of the
low-precision GEMM (CUDA ``out_dtype``; an fp32 weight copy on the CPU), so the softmax sees logits that
plain PyTorch would have rounded to bf16; the gradient w.r.t. the logits is rounded once to the inputs'
dtype, as autograd's is. d weight accumulates over chunks in fp32 and is cast to the weight's dtype once at
the end. The loss is an fp32 scalar, like the model's own loss.

Shapes: hidden (..., D), weight (V, D), labels (...) integer, bias (V,) or None; ``return_z_loss`` also
returns the (detached) z-loss part of the loss for logging. ``reduction="none"`` is not offered: per-row
upstream gradients cannot be folded into a d weight computed during the forward.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from glmwb.kernels._common import (
    cdiv,
    check_device,
    check_dtype,
    is_interpreted,
    next_power_of_2,
    num_warps_for,
)

IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum")
_BLOCK_V_GPU = 8192  # columns per loop step on a GPU: 32 fp32 registers per thread at 16 warps
_BLOCK_V_INTERPRETER = 1024  # small in the interpreter, so test vocabularies (1,031) take two loop steps


# ----------------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _fused_linear_ce_fwd_kernel(
    # pointers
    LOGITS,  # (n, V): fp32, or the inputs' dtype
    GRAD,  # (n, V): d loss / d logits in the inputs' dtype when COMPUTE_GRAD; may be LOGITS itself (in place)
    LABELS,  # (n,) integer
    LOSS,  # (n,) fp32: per-row loss (z-loss included), unscaled
    Z_LOSS,  # (n,) fp32: per-row w_z * lse^2, unscaled
    # strides (rows; the last dim is contiguous)
    stride_logits_row,
    stride_grad_row,
    # meta
    n_cols,
    ignore_index,
    scale,  # 1 / n_valid (mean) or 1 (sum): multiplies the gradient
    label_smoothing,
    z_loss_weight,
    COMPUTE_GRAD: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS + row * stride_logits_row
    grad_ptr = GRAD + row * stride_grad_row
    label = tl.load(LABELS + row).to(tl.int64)
    offsets = tl.arange(0, BLOCK_V)

    if label == ignore_index:
        # No loss and no gradient (the gradient buffer may still hold logits: write zeros over them).
        tl.store(LOSS + row, 0.0)
        tl.store(Z_LOSS + row, 0.0)
        if COMPUTE_GRAD:
            zero = tl.zeros((BLOCK_V,), tl.float32).to(GRAD.dtype.element_ty)
            for start in range(0, n_cols, BLOCK_V):
                cols = start + offsets
                tl.store(grad_ptr + cols, zero, mask=cols < n_cols)
        return

    # Pass 1, online softmax: running max m and sum of exp(z - m), rescaled when m grows.
    m = float("-inf")
    d = 0.0
    sum_z = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offsets
        mask = cols < n_cols
        z = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)  # (BLOCK_V,)
        m_new = tl.maximum(m, tl.max(z, axis=0))  # finite: every block has at least one real column
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        if HAS_SMOOTHING:
            sum_z += tl.sum(tl.where(mask, z, 0.0), axis=0)
    lse = m + tl.log(d)

    z_label = tl.load(row_ptr + label).to(tl.float32)
    z_term = z_loss_weight * lse * lse
    loss = lse - (1.0 - label_smoothing) * z_label + z_term
    if HAS_SMOOTHING:
        loss -= label_smoothing * sum_z / n_cols
    tl.store(LOSS + row, loss)
    tl.store(Z_LOSS + row, z_term)

    # Pass 2: d loss_r / d z_j = p_j (1 + 2 w_z lse) - (1 - eps) [j = y] - eps / V, times scale.
    if COMPUTE_GRAD:
        p_factor = (1.0 + 2.0 * z_loss_weight * lse) * scale
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offsets
            mask = cols < n_cols
            z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp(z - lse) * p_factor
            if HAS_SMOOTHING:
                grad -= label_smoothing * scale / n_cols
            grad = tl.where(cols == label, grad - (1.0 - label_smoothing) * scale, grad)
            tl.store(grad_ptr + cols, grad.to(GRAD.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Host launchers


def block_v_for(n_cols: int, kernel: object) -> int:
    """Columns per loop step of a row-streaming kernel (shared with kernels/logprobs.py)."""
    cap = _BLOCK_V_INTERPRETER if is_interpreted(kernel) else _BLOCK_V_GPU
    return min(next_power_of_2(n_cols), cap)


def default_chunk_size(n_rows: int, hidden_size: int, vocab_size: int) -> int:
    """Rows per chunk so that the chunk's logits (rows x V) hold about twice as many elements as the hidden
    input (N x D), rounded up to a power of two: ~ 2 N D / V. GLM-4-9B at 32,768 tokens: 2,048 rows.

    Liger-Kernel takes half that (~ N D / V). Measured on an H100 at GLM-4-9B's head and 32,768 tokens
    (docs/kernels.md, kernels.bench.sweep_lm_head): 1,024-row chunks cost 1.14x eager's time, 2,048
    rows 1.01x at 15 % of eager's peak memory, 4,096 rows 0.95x at 26 %: each chunk re-reads and re-writes
    the fp32 d weight (V x D), which small chunks pay too often."""
    per_chunk = cdiv(2 * max(n_rows, 1), max(1, cdiv(vocab_size, hidden_size)))
    return min(next_power_of_2(per_chunk), max(n_rows, 1))


def check_labels(op: str, labels: torch.Tensor, n_rows: int, vocab_size: int, ignore_index: int) -> int:
    """Labels are integers in [0, V) or ignore_index; returns the number of rows not ignored (one sync)."""
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{op}: labels must be integers, got {labels.dtype}")
    if labels.numel() != n_rows:
        raise ValueError(
            f"{op}: labels must have one entry per row ({n_rows}), got shape {tuple(labels.shape)}"
        )
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab_size))
    counts = torch.stack((valid.sum(), bad.sum())).tolist()  # one device -> host copy for both
    if counts[1]:
        first = labels[bad][0].item()
        raise ValueError(
            f"{op}: labels must be in [0, {vocab_size}) or ignore_index={ignore_index}; "
            f"{counts[1]} are not, e.g. {first}"
        )
    return int(counts[0])


def _check_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    reduction: str,
    label_smoothing: float,
    chunk_size: int | None,
) -> None:
    op = "fused_linear_cross_entropy"
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
        raise ValueError(
            f"{op}: hidden ({hidden.dtype}) and weight ({weight.dtype}) must have one dtype "
            "(under autocast both are cast to the autocast dtype)"
        )
    tensors = {"hidden": hidden, "weight": weight, "labels": labels}
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{op}: bias must be (V,) = ({weight.shape[0]},), got shape {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise ValueError(f"{op}: bias dtype {bias.dtype} must equal weight dtype {weight.dtype}")
        tensors["bias"] = bias
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be >= 1, got {chunk_size}")
    check_device(op, _fused_linear_ce_fwd_kernel, **tensors)


@functools.cache
def _fp32_out_gemms(device: torch.device) -> bool:
    """Whether ``mm(a, b, out_dtype=float32)`` and ``addmm(acc, a, b, out_dtype=float32, out=acc)`` work for
    bf16 a, b here (CUDA, PyTorch >= 2.9): tensor-core GEMMs with fp32 outputs, no low-precision rounding."""
    if device.type != "cuda":
        return False
    try:
        a = torch.randn(5, 3, device=device, dtype=torch.bfloat16)
        b = torch.randn(3, 4, device=device, dtype=torch.bfloat16)
        exact = a.float() @ b.float()
        product = torch.mm(a, b, out_dtype=torch.float32)
        acc = torch.ones(5, 4, device=device)
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return bool(torch.allclose(product, exact, atol=1e-2) and torch.allclose(acc, 1 + exact, atol=1e-2))
    except Exception:  # noqa: BLE001 - any failure means "not supported here": use the fallback
        return False


def accumulate_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b for a, b of any float dtype, without rounding the product to a's dtype where the
    device allows (shared with kernels/logprobs.py)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif _fp32_out_gemms(acc.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif acc.device.type == "cpu":
        acc.addmm_(a.float(), b.float())  # CPU: chunk-sized fp32 copies, exact products
    else:
        acc.add_(a @ b)  # older PyTorch on a GPU: one (rows, cols) low-precision temporary


class ChunkedLMHead:
    """Logits ``hidden[rows] @ weight.T + bias`` of one row chunk at a time, in fp32 where that costs no fp32
    GEMM (shared with kernels/logprobs.py).

    fp32 inputs: fp32 GEMM. Low precision on CUDA: the tensor-core GEMM with an fp32 output
    (``out_dtype``), so the softmax sees logits that were never rounded to bf16 (plain PyTorch rounds them);
    on the CPU through an fp32 copy of the weight; on a GPU whose PyTorch lacks ``out_dtype``, logits in
    the inputs' dtype. Gradients w.r.t. the logits are always written in the inputs' dtype, like autograd's.
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.dtype = weight.dtype
        if weight.dtype == torch.float32:
            self.mode = "fp32"
        elif weight.is_cuda:
            self.mode = "fp32_out" if _fp32_out_gemms(weight.device) else "native"
        else:
            self.mode = "upcast"
            self.weight_fp32 = weight.float()
        if bias is not None and self.mode in ("fp32_out", "upcast"):
            self.bias_fp32 = bias.float()

    def logits(self, start: int, end: int) -> torch.Tensor:
        """(end - start, V) logits of those rows: fp32, or the inputs' dtype in the "native" mode."""
        h = self.hidden[start:end]  # (n, D)
        if self.mode in ("fp32", "native"):
            w_t = self.weight.t()
            return torch.mm(h, w_t) if self.bias is None else torch.addmm(self.bias, h, w_t)
        if self.mode == "fp32_out":
            logits = torch.mm(h, self.weight.t(), out_dtype=torch.float32)
            return logits if self.bias is None else logits.add_(self.bias_fp32)
        w_t = self.weight_fp32.t()
        return torch.mm(h.float(), w_t) if self.bias is None else torch.addmm(self.bias_fp32, h.float(), w_t)

    def grad_buffer(self, logits: torch.Tensor) -> torch.Tensor:
        """Where the kernel writes d / d logits: over the logits when they are in the inputs' dtype."""
        return (
            logits
            if logits.dtype == self.dtype
            else torch.empty(logits.shape, dtype=self.dtype, device=logits.device)
        )


def _fused_linear_ce_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    z_loss: float,
    label_smoothing: float,
    reduction: str,
    chunk_size: int | None,
    grads: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Return (loss, z_loss, d hidden, d weight, d bias), gradients of the loss itself (None where unwanted)."""
    _check_inputs(hidden, weight, labels, bias, reduction, label_smoothing, chunk_size)
    n_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    labels = labels.reshape(-1).contiguous()
    n_valid = check_labels("fused_linear_cross_entropy", labels, n_rows, vocab_size, ignore_index)
    scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
    need_dh, need_dw, need_db = grads
    compute_grad = need_dh or need_dw or need_db

    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    z_rows = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    d_hidden = torch.empty_like(hidden) if need_dh else None
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
    d_bias = torch.zeros(vocab_size, dtype=torch.float32, device=weight.device) if need_db else None

    chunk = chunk_size or default_chunk_size(n_rows, hidden_size, vocab_size)
    block_v = block_v_for(vocab_size, _fused_linear_ce_fwd_kernel)
    head = ChunkedLMHead(hidden, weight, bias)
    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        h_chunk = hidden[start:end]  # (n, D)
        logits = head.logits(start, end)  # (n, V)
        grad_logits = head.grad_buffer(logits) if compute_grad else logits  # (n, V) in the inputs' dtype
        _fused_linear_ce_fwd_kernel[(end - start,)](
            logits, grad_logits, labels[start:end], loss_rows[start:end], z_rows[start:end],
            logits.stride(0), grad_logits.stride(0),
            vocab_size, ignore_index, scale, label_smoothing, z_loss,
            COMPUTE_GRAD=compute_grad, HAS_SMOOTHING=label_smoothing > 0, BLOCK_V=block_v,
            num_warps=num_warps_for(block_v),
        )  # fmt: skip
        if need_dh:
            torch.mm(grad_logits, weight, out=d_hidden[start:end])  # (n, D)
        if need_dw:
            accumulate_matmul(d_weight, grad_logits.t(), h_chunk)  # (V, D)
        if need_db:
            d_bias += grad_logits.sum(0, dtype=torch.float32)

    loss = loss_rows.sum() * scale
    z_part = z_rows.sum() * scale
    if d_weight is not None:
        d_weight = d_weight.to(weight.dtype)
    if d_bias is not None:
        d_bias = d_bias.to(bias.dtype)
    return loss, z_part, d_hidden, d_weight, d_bias


# ----------------------------------------------------------------------------------------------------------
# PyTorch reference


def linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    return_z_loss: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Full fp32 logits and ``F.cross_entropy``; the same loss (an fp32 scalar) as the fused op.

    The mean is over rows not ignored, and 0 (not NaN) when every row is ignored."""
    logits = hidden.float().reshape(-1, hidden.shape[-1]) @ weight.float().t()  # (N, V) fp32
    if bias is not None:
        logits = logits + bias.float()
    labels = labels.reshape(-1)
    valid = labels != ignore_index
    ce = F.cross_entropy(
        logits, labels, ignore_index=ignore_index, reduction="sum", label_smoothing=label_smoothing
    )
    z_part = (z_loss * torch.logsumexp(logits, dim=-1).pow(2) * valid).sum()
    denom = valid.sum().clamp(min=1) if reduction == "mean" else 1
    loss, z_part = (ce + z_part) / denom, z_part / denom
    return (loss, z_part.detach()) if return_z_loss else loss


# ----------------------------------------------------------------------------------------------------------
# Autograd, functional and module forms


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None,
        ignore_index: int,
        z_loss: float,
        label_smoothing: float,
        reduction: str,
        chunk_size: int | None,
        grads: tuple[bool, bool, bool],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        loss, z_part, d_hidden, d_weight, d_bias = _fused_linear_ce_fwd(
            hidden, weight, labels, bias, ignore_index, z_loss, label_smoothing, reduction, chunk_size, grads
        )
        ctx.save_for_backward(d_hidden, d_weight, d_bias)
        ctx.mark_non_differentiable(z_part)
        return loss, z_part

    @staticmethod
    def backward(ctx, d_loss: torch.Tensor, _d_z_part: torch.Tensor | None):
        d_hidden, d_weight, d_bias = ctx.saved_tensors
        # The gradients were computed for d_loss = 1 during the forward; scale them (out of place, so a
        # second backward through a retained graph sees the same saved values).
        grads = [None if g is None else g * d_loss.to(g.dtype) for g in (d_hidden, d_weight, d_bias)]
        return grads[0], grads[1], None, grads[2], None, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    z_loss: float = 0.0,
    reduction: str = "mean",
    *,
    label_smoothing: float = 0.0,
    return_z_loss: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels`` without the full logits.

    hidden (..., D), weight (V, D), labels (...) with -100 (``ignore_index``) for rows without a target,
    bias (V,) or None. z_loss: weight of the z-loss w_z * logsumexp^2 (added to the loss; with
    ``return_z_loss=True`` also returned on its own, detached). reduction: "mean" over rows not ignored
    (0 when there are none) or "sum". chunk_size: rows per chunk (default ~ 2 N D / V). Returns an fp32
    scalar. Under autocast, hidden / weight / bias are cast to the autocast dtype first (as ``F.linear``).
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    hidden2 = hidden.reshape(-1, hidden.shape[-1]) if hidden.dim() >= 1 else hidden
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"fused_linear_cross_entropy: labels shape {tuple(labels.shape)} must equal hidden's leading "
            f"dims {tuple(hidden.shape[:-1])}"
        )
    grad_on = torch.is_grad_enabled()
    grads = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    with torch.autocast(device_type, enabled=False):
        loss, z_part = FusedLinearCrossEntropyFunction.apply(
            hidden2, weight, labels, bias, ignore_index, float(z_loss), float(label_smoothing), reduction,
            chunk_size, grads,
        )  # fmt: skip
    return (loss, z_part) if return_z_loss else loss


class FusedLinearCrossEntropy(nn.Module):
    """Loss module: ``FusedLinearCrossEntropy(...)(hidden, lm_head.weight, labels, bias=None)``."""

    def __init__(
        self,
        ignore_index: int = IGNORE_INDEX,
        z_loss: float = 0.0,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        return_z_loss: bool = False,
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"FusedLinearCrossEntropy: reduction must be one of {REDUCTIONS}, got {reduction!r}"
            )
        self.ignore_index, self.z_loss, self.reduction = ignore_index, z_loss, reduction
        self.label_smoothing, self.return_z_loss = label_smoothing, return_z_loss

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return fused_linear_cross_entropy(
            hidden, weight, labels, bias, self.ignore_index, self.z_loss, self.reduction,
            label_smoothing=self.label_smoothing, return_z_loss=self.return_z_loss,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, z_loss={self.z_loss}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}"
        )
