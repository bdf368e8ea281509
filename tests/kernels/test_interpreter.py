"""The Triton interpreter's fp32 -> bf16 conversion, as patched by conftest.py, rounds like torch (and a GPU)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from tests.kernels.checks import DEVICE  # noqa: E402


@triton.jit
def _to_bf16_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(Y + offs, tl.load(X + offs, mask=mask).to(tl.bfloat16), mask=mask)


def test_fp32_to_bf16_rounds_to_nearest_even_like_torch():
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2**31 - 1, (4096,), generator=gen, dtype=torch.int64)
    special = [
        0x3F80FFFF,  # mantissa all ones below the cut: rounds up into the next exponent
        0x3FFFFFFF,  # rounds up to the next power of two
        0x3F808000,  # exact tie, even: stays
        0x3F818000,  # exact tie, odd: rounds up
        0x7F7FFFFF,  # max float: rounds to inf
        0x7F800000,  # inf
        0x00000001,  # smallest subnormal
        0x807FFFFF,  # negative subnormal
    ]
    x = torch.cat([bits, torch.tensor(special)]).to(torch.int32).view(torch.float32)
    x = torch.cat([x, -x, torch.tensor([0.0, -0.0, 1.0, float("nan")])]).to(DEVICE)
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    _to_bf16_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    expected = x.to(torch.bfloat16)
    same = (y.view(torch.int16) == expected.view(torch.int16)) | (y.isnan() & expected.isnan())
    assert same.all(), f"{(~same).sum().item()} of {x.numel()} values differ, e.g. {x[~same][:4].tolist()}"
