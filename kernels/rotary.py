"""GLM-4 rotary embedding: partial and interleaved (GPT-J pairs), on q and k in one launch.

Only the first R = rotary_dim dims of each head rotate (GLM-4: R = head_dim / 2); they form R/2 pairs
(x[2i], x[2i+1]) that turn by the angle pos * inv_freq[i], inv_freq[i] = base^(-2i / R):

    (x0, x1) -> (x0 cos - x1 sin,  x1 cos + x0 sin)

and dims R .. head_dim - 1 pass through unchanged. This is ``transformers``' glm
``apply_rotary_pos_emb`` (cos / sin repeat-interleaved, ``rotate_half(x) = stack(-x[1::2], x[0::2])``).
The rotation is orthogonal, so the backward is the same kernel turning by -angle (inv_freq negated).

API: ``apply_rotary(q, k, position_ids, inv_freq) -> (q_out, k_out)`` with q (B, T, Hq, D),
k (B, T, Hkv, D) (any GQA ratio; any strides but a contiguous last dim, so q and k may be views of one
fused qkv projection), position_ids (B, T) or (1, T) integers (arbitrary per token: packed documents
restart at 0) and inv_freq (R / 2,) (R = 2 * len(inv_freq) <= D). Outputs are new contiguous
(B, T, H, D) tensors; the inputs are never written. ``apply_rotary_qkv_(qkv, position_ids, inv_freq, H, K)``
rotates the q and k heads of a fused qkv projection output in place instead, reading and writing only
their first R dims (forward and backward): half the bytes for GLM, whose other half passes through.

Why angles in the kernel rather than a cos / sin cache: one program handles a few whole tokens, all Hq + Hkv
heads of each, so it computes R/2 sin / cos pairs per token and reuses them over (Hq + Hkv) * D / 2 rotations; the op
stays memory-bound on q and k alone, with no (B, T, R) cos / sin tensors to build, store or read per
forward, no cache length to outgrow, and packed positions cost nothing extra. The angle is
pos (fp32) * inv_freq (fp32), the same fp32 product as Hugging Face, and cos / sin stay fp32 (Hugging
Face rounds them to the activation dtype, a 2^-9 relative error in bf16 that this kernel does not
make). Rope variants that rescale frequencies (linear, NTK, Llama-3) only change inv_freq and work as is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from glmwb.kernels._common import cdiv, check_device, check_dtype, next_power_of_2, num_warps_for

_TILE_ELEMS = 4096  # tokens per program: as many as fit this many elements of q (32 heads x 128 dims)
MAX_HEAD_ELEMS = 16384  # one token's q heads are one tile: next_pow2(Hq) x next_pow2(D) at most this


# ----------------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _rotate(x, cos, sin, rotates, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_T, BLOCK_H, BLOCK_D) whole head rows -> rotated, fp32; the pairs are split in registers."""
    x0, x1 = tl.split(tl.reshape(x.to(tl.float32), (BLOCK_T, BLOCK_H, BLOCK_D // 2, 2)))
    y0 = tl.where(rotates, x0 * cos - x1 * sin, x0)  # pass-through dims stay bit-exact
    y1 = tl.where(rotates, x1 * cos + x0 * sin, x1)
    return tl.reshape(tl.join(y0, y1), (BLOCK_T, BLOCK_H, BLOCK_D))


@triton.jit
def _rotary_fwd_kernel(
    # pointers
    Q,
    K,
    Q_OUT,
    K_OUT,
    POSITION_IDS,
    INV_FREQ,
    # strides (batch, token, head; the last dim is contiguous)
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_qob,
    stride_qot,
    stride_qoh,
    stride_kob,
    stride_kot,
    stride_koh,
    stride_pb,
    stride_pt,
    # meta
    n_tokens,  # B * T
    seq_len,
    n_q_heads,
    n_kv_heads,
    head_dim,  # the extent rotated per head: D out of place, R in place
    half_rotary,  # R / 2 = len(inv_freq)
    BLOCK_T: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per BLOCK_T tokens: every q and k head of each, one set of angles per token. Both tiles
    # are loaded before any arithmetic, so a program has all its bytes in flight at once.
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,) over B * T
    tok_mask = tok < n_tokens
    b = tok // seq_len
    t = tok % seq_len
    dims = tl.arange(0, BLOCK_D)[None, None, :]  # (1, 1, BLOCK_D)
    q_heads = tl.arange(0, BLOCK_HQ)[None, :, None]  # (1, BLOCK_HQ, 1)
    k_heads = tl.arange(0, BLOCK_HK)[None, :, None]
    row_mask = tok_mask[:, None, None] & (dims < head_dim)
    q_mask = row_mask & (q_heads < n_q_heads)  # (BLOCK_T, BLOCK_HQ, BLOCK_D)
    k_mask = row_mask & (k_heads < n_kv_heads)
    q_offs = (b * stride_qb + t * stride_qt)[:, None, None] + q_heads * stride_qh + dims
    k_offs = (b * stride_kb + t * stride_kt)[:, None, None] + k_heads * stride_kh + dims
    q = tl.load(Q + q_offs, mask=q_mask, other=0.0)
    k = tl.load(K + k_offs, mask=k_mask, other=0.0)

    pos = tl.load(POSITION_IDS + b * stride_pb + t * stride_pt, mask=tok_mask, other=0).to(tl.float32)
    pairs = tl.arange(0, BLOCK_D // 2)
    inv_freq = tl.load(INV_FREQ + pairs, mask=pairs < half_rotary, other=0.0)
    angle = pos[:, None, None] * inv_freq[None, None, :]  # (BLOCK_T, 1, BLOCK_D / 2), fp32 as Hugging Face
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    rotates = (pairs < half_rotary)[None, None, :]

    q_rot = _rotate(q, cos, sin, rotates, BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_HQ, BLOCK_D=BLOCK_D)
    k_rot = _rotate(k, cos, sin, rotates, BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_HK, BLOCK_D=BLOCK_D)
    q_out_offs = (b * stride_qob + t * stride_qot)[:, None, None] + q_heads * stride_qoh + dims
    k_out_offs = (b * stride_kob + t * stride_kot)[:, None, None] + k_heads * stride_koh + dims
    tl.store(Q_OUT + q_out_offs, q_rot.to(Q_OUT.dtype.element_ty), mask=q_mask)
    tl.store(K_OUT + k_out_offs, k_rot.to(K_OUT.dtype.element_ty), mask=k_mask)


# ----------------------------------------------------------------------------------------------------------
# Host launchers


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor
) -> None:
    op = "apply_rotary"
    check_dtype(op, "q", q)
    check_dtype(op, "k", k)
    if q.dtype != k.dtype:
        raise ValueError(f"{op}: q and k must have one dtype, got {q.dtype} and {k.dtype}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"{op}: q and k must be (B, T, H, D), got shapes {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"{op}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, tokens and head_dim"
        )
    batch, seq_len, _, head_dim = q.shape
    if (
        position_ids.dtype.is_floating_point
        or position_ids.dtype.is_complex
        or position_ids.dtype == torch.bool
    ):
        raise ValueError(f"{op}: position_ids must be integers, got {position_ids.dtype}")
    if position_ids.dim() != 2 or position_ids.shape[1] != seq_len or position_ids.shape[0] not in (1, batch):
        raise ValueError(
            f"{op}: position_ids must be (B, T) = ({batch}, {seq_len}) or (1, {seq_len}), "
            f"got {tuple(position_ids.shape)}"
        )
    if inv_freq.dim() != 1 or not inv_freq.dtype.is_floating_point:
        raise ValueError(
            f"{op}: inv_freq must be a 1-D float tensor (rotary_dim / 2,), got {inv_freq.dtype} "
            f"of shape {tuple(inv_freq.shape)}"
        )
    if next_power_of_2(q.shape[2]) * next_power_of_2(head_dim) > MAX_HEAD_ELEMS:
        raise ValueError(
            f"{op}: {q.shape[2]} q heads of {head_dim} dims exceed one tile (next powers of two multiplied "
            f"at most {MAX_HEAD_ELEMS}); use rotary_ref for such shapes"
        )
    rotary_dim = 2 * inv_freq.shape[0]
    if rotary_dim > head_dim:
        raise ValueError(f"{op}: rotary_dim = 2 * len(inv_freq) = {rotary_dim} exceeds head_dim {head_dim}")
    check_device(op, _rotary_fwd_kernel, q=q, k=k, position_ids=position_ids, inv_freq=inv_freq)


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    extent: int,
    *,
    block_t: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Rotate dims [0, extent) of every q and k head into q_out / k_out (which may be q / k themselves),
    BLOCK_T tokens per program; position_ids (B, T) (a broadcast view is fine), inv_freq fp32 contiguous.
    block_t / num_warps override the heuristics (``kernels.bench.tune_kernels`` sweeps them)."""
    batch, seq_len, n_q_heads, _ = q.shape
    n_kv_heads = k.shape[2]
    block_d = max(2, next_power_of_2(extent))
    block_hq = next_power_of_2(max(n_q_heads, 1))
    block_hk = next_power_of_2(max(n_kv_heads, 1))
    block_t = block_t or max(1, _TILE_ELEMS // (block_hq * block_d))
    n_tokens = batch * seq_len
    _rotary_fwd_kernel[(cdiv(n_tokens, block_t),)](
        q, k, q_out, k_out, position_ids, inv_freq,
        *q.stride()[:3], *k.stride()[:3], *q_out.stride()[:3], *k_out.stride()[:3], *position_ids.stride(),
        n_tokens, seq_len, n_q_heads, n_kv_heads, extent, inv_freq.shape[0],
        BLOCK_T=block_t, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_D=block_d,
        num_warps=num_warps or num_warps_for(block_t * block_hq * block_d),
    )  # fmt: skip


def _rotary(
    q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by position_ids * inv_freq in one launch; returns new contiguous tensors."""
    batch, seq_len, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    q_out = torch.empty((batch, seq_len, n_q_heads, head_dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((batch, seq_len, n_kv_heads, head_dim), dtype=k.dtype, device=k.device)
    if batch * seq_len > 0:
        position_ids = position_ids.expand(batch, seq_len)  # (1, T) broadcasts with stride 0
        _launch(q, k, q_out, k_out, position_ids, inv_freq.to(torch.float32).contiguous(), head_dim)
    return q_out, k_out


def _rotary_inplace(
    q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor
) -> None:
    """Rotate the first R dims of every q and k head IN PLACE, one launch; dims R .. D - 1 are neither read nor
    written (half the bytes of the out-of-place kernel for GLM's R = D / 2). q, k: views with a contiguous
    last dim (e.g. of one fused qkv buffer). The same kernel as ``_rotary``, its output pointers the inputs'
    and its head extent R instead of D."""
    batch, seq_len = q.shape[:2]
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("apply_rotary_qkv_: q and k need a contiguous last dim to be rotated in place")
    if batch * seq_len > 0 and inv_freq.shape[0] > 0:
        position_ids = position_ids.expand(batch, seq_len)
        _launch(q, k, q, k, position_ids, inv_freq.to(torch.float32).contiguous(), 2 * inv_freq.shape[0])


def _qk_views(
    qkv: torch.Tensor, position_ids: torch.Tensor, num_heads: int, num_kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, T, H, D) and k (B, T, K, D) views of a fused (B * T or B x T, (H + 2K) * D) projection output."""
    op = "apply_rotary_qkv_"
    n_slots = num_heads + 2 * num_kv_heads
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(
            f"{op}: num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})"
        )
    if qkv.dim() < 2 or qkv.shape[-1] % n_slots or not qkv.is_contiguous():
        raise ValueError(
            f"{op}: qkv must be a contiguous (..., (num_heads + 2 * num_kv_heads) * head_dim) tensor, "
            f"(..., {n_slots} * head_dim) here, got shape {tuple(qkv.shape)} (contiguous: {qkv.is_contiguous()})"
        )
    if position_ids.dim() != 2:
        raise ValueError(f"{op}: position_ids must be (B, T) or (1, T), got {tuple(position_ids.shape)}")
    seq_len = position_ids.shape[1]
    rows = qkv.numel() // qkv.shape[-1]
    if seq_len == 0 or rows % seq_len:
        raise ValueError(f"{op}: qkv holds {rows} tokens, not a whole number of sequences of T = {seq_len}")
    view = qkv.view(rows // seq_len, seq_len, n_slots, qkv.shape[-1] // n_slots)  # (B, T, H + 2K, D)
    return view[:, :, :num_heads], view[:, :, num_heads : num_heads + num_kv_heads]


def _rotary_fwd(
    q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_inputs(q, k, position_ids, inv_freq)
    return _rotary(q, k, position_ids, inv_freq)


def _rotary_bwd(
    dq_out: torch.Tensor, dk_out: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # R(a)^T = R(-a): the same kernel with the frequencies negated (exact: cos is even, sin is odd).
    return _rotary(dq_out, dk_out, position_ids, -inv_freq)


# ----------------------------------------------------------------------------------------------------------
# PyTorch reference


def rotary_inv_freq(
    rotary_dim: int, base: float = 10000.0, device: torch.device | str | None = None
) -> torch.Tensor:
    """inv_freq[i] = 1 / base^(2i / R), i < R / 2, in fp32: the same float ops as Hugging Face's default
    rope. GLM-4: R = head_dim * partial_rotary_factor (0.5); base = 10,000 x rope_ratio."""
    if rotary_dim % 2:
        raise ValueError(f"rotary_inv_freq: rotary_dim must be even (pairs), got {rotary_dim}")
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim
    return 1.0 / (base**exponents)


def rotary_ref(
    q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch, fp32 math, outputs in the inputs' dtype; q (B, T, Hq, D), k (B, T, Hkv, D)."""
    angle = position_ids[..., None].float() * inv_freq.float()  # (B, T, R/2)
    cos, sin = angle.cos()[:, :, None], angle.sin()[:, :, None]  # (B, T, 1, R/2)
    rotary_dim = 2 * inv_freq.shape[0]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x_rot, x_pass = x32[..., :rotary_dim], x32[..., rotary_dim:]  # (B, T, H, R), (B, T, H, D - R)
        x0, x1 = x_rot.unflatten(-1, (-1, 2)).unbind(-1)  # (B, T, H, R/2) each: the interleaved pairs
        rotated = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)  # (B, T, H, R)
        return torch.cat((rotated, x_pass), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


# ----------------------------------------------------------------------------------------------------------
# Autograd, functional and module forms


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q_out, k_out = _rotary_fwd(q, k, position_ids, inv_freq)
        ctx.save_for_backward(position_ids, inv_freq)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out: torch.Tensor, dk_out: torch.Tensor):
        position_ids, inv_freq = ctx.saved_tensors
        dq, dk = _rotary_bwd(dq_out, dk_out, position_ids, inv_freq)
        return dq, dk, None, None


class RotaryQKVInplaceFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        qkv: torch.Tensor,
        position_ids: torch.Tensor,
        inv_freq: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
    ) -> torch.Tensor:
        q, k = _qk_views(qkv, position_ids, num_heads, num_kv_heads)
        _check_inputs(q, k, position_ids, inv_freq)
        _rotary_inplace(q, k, position_ids, inv_freq)
        ctx.mark_dirty(qkv)
        ctx.save_for_backward(position_ids, inv_freq)
        ctx.heads = (num_heads, num_kv_heads)
        return qkv

    @staticmethod
    def backward(ctx, d_qkv: torch.Tensor):
        position_ids, inv_freq = ctx.saved_tensors
        # The gradient reaching the fused buffer is rotated back in place (flash-attn's rotary does the same):
        # it comes fresh from the split / view backward that made q, k and v. A strided one is copied first.
        d_qkv = d_qkv.contiguous()
        dq, dk = _qk_views(d_qkv, position_ids, *ctx.heads)
        _rotary_inplace(dq, dk, position_ids, -inv_freq)
        return d_qkv, None, None, None, None


def apply_rotary_qkv_(
    qkv: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor, num_heads: int, num_kv_heads: int
) -> torch.Tensor:
    """GLM rotary IN PLACE on the q and k heads of a fused projection output; returns ``qkv`` itself.

    qkv: contiguous (B * T, (H + 2K) * D) or (B, T, (H + 2K) * D), tokens in (B, T) order, heads laid out
    q | k | v (our ``qkv_proj``). Only the first R = 2 * len(inv_freq) dims of each q / k head are read and
    written, forward and backward: half the bytes of ``apply_rotary`` for GLM, which must copy the
    pass-through half too. qkv must be an op's fresh output (a Linear on 2-D input is), not a leaf that
    requires grad (autograd forbids that) and best not a view (autograd would copy the whole buffer's
    gradient to rebase it). Values equal ``apply_rotary``'s on the split (bitwise in the interpreter; on a GPU the
    two kernel specialisations may round a multiply-add one ulp apart). The backward rotates the
    gradient it receives in place (as flash-attn's rotary does): in a model that is the fresh output of the
    split that made q, k and v; a caller handing ``backward`` its own tensor gets it back modified.
    """
    if qkv.requires_grad and qkv.is_leaf:
        raise ValueError(
            "apply_rotary_qkv_: qkv is a leaf that requires grad and cannot be rotated in place; pass the "
            "projection's output, or use apply_rotary (out of place)"
        )
    return RotaryQKVInplaceFunction.apply(qkv, position_ids, inv_freq, num_heads, num_kv_heads)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton GLM rotary on q (B, T, Hq, D) and k (B, T, Hkv, D) in one launch; see the module docstring."""
    return RotaryFunction.apply(q, k, position_ids, inv_freq)


class TritonRotary(nn.Module):
    """Holds GLM's inv_freq (a non-persistent buffer, as ``GlmRotaryEmbedding``) and applies the kernel."""

    def __init__(self, head_dim: int, partial_rotary_factor: float = 0.5, base: float = 10000.0) -> None:
        super().__init__()
        self.rotary_dim = int(head_dim * partial_rotary_factor)
        self.register_buffer("inv_freq", rotary_inv_freq(self.rotary_dim, base), persistent=False)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary(q, k, position_ids, self.inv_freq)

    def extra_repr(self) -> str:
        return f"rotary_dim={self.rotary_dim}"
