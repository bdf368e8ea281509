"""Shared pieces of the CPU suite: the tiny GLM shape most tests build, and the one-thread fixture.

from tests.tiny import TINY, one_thread  # noqa: F401 (one_thread: an autouse fixture, active once imported)
"""

from __future__ import annotations

import pytest
import torch

from glmwb.pretrain.config import GLMConfig

# 2 layers, hidden 48, GQA 4:2, head 12: a few hundred thousand parameters with the 832-token test tokenizer
TINY = GLMConfig(
    vocab_size=832,
    hidden_size=48,
    intermediate_size=80,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=12,
    max_position_embeddings=256,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread per test module: on 2 shared cores two OpenMP threads mostly wait on each other
    (10-40x slower steps here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
