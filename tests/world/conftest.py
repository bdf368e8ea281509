"""The world the tests of the world share: seed 0, 96 entities, and samples of its train and held-out prompts."""

from __future__ import annotations

import pytest

from glmwb.pretrain.world import Prompt, World, make_world


@pytest.fixture(scope="module")
def world() -> World:
    return make_world(seed=0)


@pytest.fixture(scope="module")
def train(world: World) -> list[Prompt]:
    return world.prompts("train", 600, seed=0)


@pytest.fixture(scope="module")
def heldout(world: World) -> list[Prompt]:
    return world.prompts("heldout", 300, seed=0)
