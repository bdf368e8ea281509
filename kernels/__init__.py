"""Triton kernels with PyTorch references, attention dispatch and ``apply_kernels``.

Issue 3 is landing in parts. Here now, one file per op (Triton kernels, host launchers, ``<op>_ref``
in plain PyTorch, autograd Function, functional form, module):

- ``kernels.rmsnorm``: ``rmsnorm``, ``rmsnorm_add`` (fused residual add), ``TritonRMSNorm``
- ``kernels.swiglu``: ``swiglu`` on the fused gate-first ``gate_up``, ``TritonSwiGLU``
- ``kernels.rotary``: ``apply_rotary`` (GLM partial interleaved rotary, q and k in one launch),
  ``rotary_inv_freq``, ``TritonRotary``

Not built yet: attention dispatch, fused linear + cross-entropy, log-prob gathering and
``apply_kernels``. The model runs on plain PyTorch (``torch.nn.functional.scaled_dot_product_attention``)
until then. On a CPU the kernels run only under ``TRITON_INTERPRET=1`` (set before they are first
imported); the ``*_ref`` functions need no GPU.

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
    "rotary_ref": "kernels.rotary",
    "rotary_inv_freq": "kernels.rotary",
    "TritonRotary": "kernels.rotary",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
