"""Fixtures for the reward tests: a tiny GLM config, a tiny reward folder, a planted-preference data set."""

from __future__ import annotations

import random

import pytest
import torch

from glmwb.annotation.records import PreferenceRecord
from glmwb.pretrain.model import GLM
from tests.tiny import TINY

WORDS = "the quick brown fox jumps over lazy dog reward model scores two answers better one chosen".split()
MARKER = "😀"  # the planted preference: answers with it are better


def tiny_glm(tokenizer, seed: int = 0) -> GLM:
    torch.manual_seed(seed)
    return GLM(TINY.with_(pad_token_id=tokenizer.pad_token_id))


def planted_records(n: int, seed: int = 0, tie_fraction: float = 0.0) -> list[PreferenceRecord]:
    """Random word salad; the chosen answer carries MARKER somewhere, the rejected one never does.
    With ``tie_fraction``, that share of pairs are ties of two marker-free answers."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = " ".join(rng.choices(WORDS, k=rng.randint(3, 8)))
        a = " ".join(rng.choices(WORDS, k=rng.randint(2, 10)))
        b = " ".join(rng.choices(WORDS, k=rng.randint(2, 10)))
        if rng.random() < tie_fraction:
            out.append(PreferenceRecord.from_dict({"prompt": q, "chosen": a, "rejected": b, "tie": True}))
            continue
        words = a.split()
        words.insert(rng.randint(0, len(words)), MARKER)
        out.append(
            PreferenceRecord.from_dict({"prompt": q, "chosen": " ".join(words), "rejected": b, "id": str(i)})
        )
    return out


@pytest.fixture(scope="session")
def reward_folder(tiny_tokenizer, tmp_path_factory):
    """An untrained two-head reward model saved as a GlmForSequenceClassification folder (+ tokenizer)."""
    from glmwb.rewards.model import RewardModel

    model = RewardModel(tiny_glm(tiny_tokenizer), heads=["reward", "correctness"])
    model.info.reward_mean, model.info.reward_std = [0.5, 0.0], [2.0, 1.0]
    return model.save(tmp_path_factory.mktemp("reward") / "rm", tokenizer=tiny_tokenizer)
