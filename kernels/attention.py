"""Attention dispatch: flash-attn when it is installed and can run, else PyTorch SDPA. No Triton here.

Layout (flash-attn's, token-major): q (B, T, Hq, D), k and v (B, S, Hkv, D) with Hq a multiple of Hkv
(grouped-query attention: GLM-4-9B has 32 query and 2 key/value heads); the output is (B, T, Hq, D).

    out[b, t, h] = sum_s softmax_s(scale * q[b, t, h] . k[b, s, h // (Hq / Hkv)] + mask) v[b, s, h // (Hq / Hkv)]

Masks, combined (all must allow a key for the query to see it):

- ``causal``: query t sees keys s <= t + (S - T) (bottom-right aligned, as flash-attn >= 2.1: with a KV
  cache the T new queries are the last T positions).
- packed documents, by ``doc_ids`` (B, T) (a token sees only its own document) or by ``cu_seqlens``
  (flash-attn's varlen form: int32 (n_docs + 1,) offsets of the documents in the B * T flattened tokens,
  which may cross batch rows; ``max_seqlen`` the longest, else computed). Needs S = T.
- ``attn_mask``: any SDPA mask broadcastable to (B, Hq, T, S), bool (True = may attend) or additive float.
  Rows that see no key at all give NaN in SDPA: let every query see itself.

Backends (``attention_backend`` says which a call would use):

- ``"flash_attn"``: ``flash_attn_func`` / ``flash_attn_varlen_func`` (packed: doc_ids or cu_seqlens) when
  ``flash_attn`` imports, the tensors are CUDA fp16 / bf16, there is no ``attn_mask`` and D <= 256.
- ``"sdpa"``: ``F.scaled_dot_product_attention`` on (B, H, T, D) transposes, GQA through ``enable_gqa``,
  a block-diagonal causal boolean mask for packed documents (the flattened (1, B*T) sequence for
  cu_seqlens); plain causal attention keeps SDPA's ``is_causal`` fast path.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

BACKENDS = ("flash_attn", "sdpa")


# ----------------------------------------------------------------------------------------------------------
# Helpers


@functools.cache
def flash_attn_available() -> bool:
    """flash-attn imports (it needs CUDA and a matching build)."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        import flash_attn  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def cu_seqlens_from_doc_ids(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """doc_ids (B, T) -> (cu_seqlens int32 (n_docs + 1,), max_seqlen) over the B * T flattened tokens.

    A document starts where the id changes along a row and at the start of every row (rows never share a
    document, even with equal ids). One device -> host copy for max_seqlen.
    """
    if doc_ids.dim() != 2:
        raise ValueError(f"cu_seqlens_from_doc_ids: doc_ids must be (B, T), got shape {tuple(doc_ids.shape)}")
    batch, seq_len = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)  # (B, T): True where a document starts
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = starts.flatten().nonzero().flatten()  # (n_docs,)
    total = torch.tensor([batch * seq_len], device=doc_ids.device)
    cu_seqlens = torch.cat((start_idx, total)).to(torch.int32)  # (n_docs + 1,)
    max_seqlen = int(cu_seqlens.diff().max().item()) if cu_seqlens.numel() > 1 else 0
    return cu_seqlens, max_seqlen


def _doc_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(n_docs + 1,) offsets -> (1, total) document index of each flattened token."""
    positions = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:-1].to(torch.int64), positions, right=True)[None]


def _check_inputs(q, k, v, cu_seqlens, doc_ids, attn_mask, dropout_p) -> None:
    op = "attention"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"{op}: q, k, v must be (B, T, H, D), got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} must have one shape")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{op}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch and head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"{op}: query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"{op}: q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens is not None and doc_ids is not None:
        raise ValueError(f"{op}: give doc_ids or cu_seqlens, not both")
    if cu_seqlens is not None and attn_mask is not None:
        raise ValueError(f"{op}: attn_mask cannot be combined with cu_seqlens (use doc_ids)")
    if (cu_seqlens is not None or doc_ids is not None) and q.shape[1] != k.shape[1]:
        raise ValueError(
            f"{op}: packed documents need as many keys as queries, got T={q.shape[1]}, S={k.shape[1]}"
        )
    if doc_ids is not None and doc_ids.shape != q.shape[:2]:
        raise ValueError(f"{op}: doc_ids must be (B, T) = {tuple(q.shape[:2])}, got {tuple(doc_ids.shape)}")
    if cu_seqlens is not None:
        total = q.shape[0] * q.shape[1]
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(
                f"{op}: cu_seqlens must be 1-D (n_docs + 1,), got shape {tuple(cu_seqlens.shape)}"
            )
        ends = cu_seqlens[[0, -1]].tolist()
        if ends != [0, total]:
            raise ValueError(
                f"{op}: cu_seqlens must run from 0 to B * T = {total}, got {ends[0]} .. {ends[1]}"
            )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")


def attention_backend(
    q: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None, backend: str = "auto"
) -> str:
    """Which backend ``attention`` uses: for a given q (and mask), or on this machine for bf16 CUDA tensors.
    ``backend="sdpa"`` always answers "sdpa"; "auto" picks flash-attn where it can run."""
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"attention: backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend == "sdpa" or not flash_attn_available() or attn_mask is not None:
        if backend == "flash_attn":
            raise ValueError("attention: backend='flash_attn' needs flash-attn installed and no attn_mask")
        return "sdpa"
    if q is None:
        return "flash_attn" if torch.cuda.is_available() else "sdpa"
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        return "flash_attn"
    return "sdpa"


# ----------------------------------------------------------------------------------------------------------
# Backends


def _flash(q, k, v, causal, cu_seqlens, max_seqlen, doc_ids, scale, dropout_p) -> torch.Tensor:
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    if doc_ids is not None:
        cu_seqlens, max_seqlen = cu_seqlens_from_doc_ids(doc_ids)
    if cu_seqlens is None:
        return flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=scale, causal=causal)
    batch, seq_len = q.shape[:2]
    cu_seqlens = cu_seqlens.to(torch.int32)
    if max_seqlen is None:
        max_seqlen = int(cu_seqlens.diff().max().item())
    out = flash_attn_varlen_func(
        q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),  # (B * T, H, D)
        cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
        dropout_p=dropout_p, softmax_scale=scale, causal=causal,
    )  # fmt: skip
    return out.unflatten(0, (batch, seq_len))  # (B, T, Hq, D)


def _sdpa(q, k, v, causal, cu_seqlens, doc_ids, attn_mask, scale, dropout_p) -> torch.Tensor:
    batch, seq_len, n_heads, head_dim = q.shape
    if cu_seqlens is not None:  # documents may cross rows: attend over the flattened (1, B * T) sequence
        doc_ids = _doc_ids_from_cu_seqlens(cu_seqlens, batch * seq_len)
        q, k, v = (
            q.reshape(1, -1, *q.shape[2:]),
            k.reshape(1, -1, *k.shape[2:]),
            v.reshape(1, -1, *v.shape[2:]),
        )
    n_tokens, n_keys = q.shape[1], k.shape[1]

    mask = None  # bool (B or 1, 1, T, S), True = may attend
    if causal and (doc_ids is not None or attn_mask is not None or n_tokens != n_keys):
        q_pos = torch.arange(n_keys - n_tokens, n_keys, device=q.device)  # bottom-right aligned
        mask = (torch.arange(n_keys, device=q.device)[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, S)
    if doc_ids is not None:
        same_doc = (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]  # (B, 1, T, T)
        mask = same_doc if mask is None else mask & same_doc
    if attn_mask is not None:
        if mask is None:
            mask = attn_mask
        elif attn_mask.dtype == torch.bool:
            mask = mask & attn_mask
        else:  # additive float mask
            mask = attn_mask.masked_fill(~mask, float("-inf"))
    is_causal = causal and mask is None

    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D) views
    enable_gqa = q.shape[1] != k.shape[1]
    if enable_gqa and mask is not None and q.device.type == "cuda":
        # CUDA's SDPA kernels that take a mask do not take enable_gqa (only the slow math one would): share
        # the kv heads explicitly, as transformers does; query head h reads kv head h // (Hq / Hkv)
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        enable_gqa = False
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
    )  # (B, Hq, T, D)
    return out.transpose(1, 2).reshape(batch, seq_len, n_heads, head_dim)  # (B, T, Hq, D)


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    doc_ids: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Naive softmax(q k^T * scale + mask) v in fp32, returned in q's dtype: the tests' reference."""
    n_q, n_kv = q.shape[2], k.shape[2]
    q32, k32, v32 = (t.float().transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    k32 = k32.repeat_interleave(n_q // n_kv, dim=1)
    v32 = v32.repeat_interleave(n_q // n_kv, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q32 @ k32.transpose(-1, -2)) * scale  # (B, H, T, S)
    n_tokens, n_keys = scores.shape[-2:]
    allowed = torch.ones(n_tokens, n_keys, dtype=torch.bool, device=q.device)[None, None]
    if causal:
        allowed = allowed & torch.ones_like(allowed[0, 0]).tril(n_keys - n_tokens)
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = allowed & attn_mask
    elif attn_mask is not None:
        scores = scores + attn_mask.float()
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v32).transpose(1, 2).to(q.dtype)  # (B, T, H, D)


# ----------------------------------------------------------------------------------------------------------
# Public entry point


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    doc_ids: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention on (B, T, H, D) tensors; see the module docstring for masks and backends.

    scale defaults to 1 / sqrt(D). backend: "auto" (flash-attn where it can run, else SDPA), "sdpa" or
    "flash_attn" (an error where it cannot run). Returns (B, T, Hq, D) in q's dtype.
    """
    _check_inputs(q, k, v, cu_seqlens, doc_ids, attn_mask, dropout_p)
    chosen = attention_backend(q, attn_mask, backend)
    if backend == "flash_attn" and chosen != "flash_attn":
        raise ValueError(
            "attention: backend='flash_attn' needs CUDA fp16 / bf16 tensors with head_dim <= 256"
        )
    if chosen == "flash_attn":
        return _flash(q, k, v, causal, cu_seqlens, max_seqlen, doc_ids, scale, dropout_p)
    return _sdpa(q, k, v, causal, cu_seqlens, doc_ids, attn_mask, scale, dropout_p)
