"""Triton kernels with PyTorch references, attention dispatch and ``apply_kernels``.

One file per op (Triton kernels, host launchers, ``<op>_ref`` in plain PyTorch, autograd Function,
functional form, module); docs/kernels.md describes them all:

- ``kernels.rmsnorm``: ``rmsnorm``, ``rmsnorm_add`` (fused residual add), ``TritonRMSNorm``
- ``kernels.swiglu``: ``swiglu`` on the fused gate-first ``gate_up``, ``TritonSwiGLU``
- ``kernels.rotary``: ``apply_rotary`` (GLM partial interleaved rotary, q and k in one launch),
  ``apply_rotary_qkv_`` (the same in place on a fused qkv buffer, rotating half only), ``rotary_inv_freq``,
  ``TritonRotary``
- ``kernels.fused_linear_ce``: ``fused_linear_cross_entropy`` (LM head + CE without the full logits),
  ``linear_cross_entropy_ref``, ``FusedLinearCrossEntropy``
- ``kernels.logprobs``: ``selective_logprobs`` (from logits), ``linear_selective_logprobs`` (chunked from
  hidden states), with entropy and temperature; ``SelectiveLogprobs``
- ``kernels.attention``: ``attention`` (flash-attn when it can run, else SDPA; packed documents, GQA),
  ``attention_backend``, ``cu_seqlens_from_doc_ids`` (import ``attention`` from ``kernels.attention``: the
  package attribute of that name is the submodule)
- ``kernels.apply``: ``apply_kernels`` / ``revert_kernels`` for our GLM and ``transformers``' Glm / Glm4,
  chosen by a ``KernelConfig``

On a CPU the kernels run only under ``TRITON_INTERPRET=1`` (set before they are first imported); the
``*_ref`` functions and ``attention`` need no GPU.

The names below are imported lazily, so ``import kernels`` needs neither Triton nor a GPU.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "rmsnorm": "kernels.rmsnorm",
    "rmsnorm_add": "kernels.rmsnorm",
    "rmsnorm_ref": "kernels.rmsnorm",
    "rmsnorm_add_ref": "kernels.rmsnorm",
    "TritonRMSNorm": "kernels.rmsnorm",
    "swiglu": "kernels.swiglu",
    "swiglu_ref": "kernels.swiglu",
    "TritonSwiGLU": "kernels.swiglu",
    "apply_rotary": "kernels.rotary",
    "apply_rotary_qkv_": "kernels.rotary",
    "rotary_ref": "kernels.rotary",
    "rotary_inv_freq": "kernels.rotary",
    "TritonRotary": "kernels.rotary",
    "fused_linear_cross_entropy": "kernels.fused_linear_ce",
    "linear_cross_entropy_ref": "kernels.fused_linear_ce",
    "FusedLinearCrossEntropy": "kernels.fused_linear_ce",
    "selective_logprobs": "kernels.logprobs",
    "selective_logprobs_ref": "kernels.logprobs",
    "linear_selective_logprobs": "kernels.logprobs",
    "linear_selective_logprobs_ref": "kernels.logprobs",
    "SelectiveLogprobs": "kernels.logprobs",
    "attention_ref": "kernels.attention",
    "attention_backend": "kernels.attention",
    "cu_seqlens_from_doc_ids": "kernels.attention",
    "apply_kernels": "kernels.apply",
    "revert_kernels": "kernels.apply",
    "KernelConfig": "kernels.apply",
    "KernelHandle": "kernels.apply",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
