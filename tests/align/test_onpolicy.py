"""The on-policy pair builder on a planted task: answers whose kinds (and so labels) are known, a sampler
whose k is counted, and k real samples from a tiny policy."""

from __future__ import annotations

import pytest

from glmwb.align.onpolicy import (
    best_worst_records,
    build_onpolicy_pairs,
    label_answers,
    sample_k,
    world_specs,
)
from glmwb.pretrain.world import make_world
from tests.rewards.conftest import tiny_glm
from tests.tiny import one_thread  # noqa: F401 (one_thread: autouse fixture)

# the planted sampler's answers, in order: kinds of World.responses
PLANTED = ("wrong", "verbose", "correct", "off_topic")


@pytest.fixture(scope="module")
def planted():
    world = make_world(seed=0, num_entities=24)
    specs = world_specs(world, "train", 6, seed=1, families=("fact",))
    assert specs, "the planted task needs fact prompts"
    by_kind = {}
    for s in specs:
        prompt = world.prompts("train", 200, seed=1)
        p = next(q for q in prompt if q.id == s.uid)
        by_kind[s.uid] = {r.kind: r.text for r in world.responses(p)}
    calls = []

    def sample_fn(sp, k):
        calls.append(k)
        return {s.uid: [by_kind[s.uid][kind] for kind in PLANTED[:k]] for s in sp}

    return specs, by_kind, sample_fn, calls


def test_checker_pairs_a_right_answer_with_a_wrong_one(planted):
    specs, by_kind, sample_fn, calls = planted
    records, facts = build_onpolicy_pairs(
        specs, sample_fn, 4, lambda sp, ans: label_answers("checker", sp, ans), 0.0, "checker"
    )
    assert calls[-1] == 4 and facts["answers"] == 4 * len(specs) and facts["pairs"] == len(specs)
    for rec, s in zip(records, specs, strict=True):
        # checker scores 0, 1, 1, 0: the first of the best (verbose) against the first of the worst (wrong)
        assert (rec.chosen, rec.rejected) == (by_kind[s.uid]["verbose"], by_kind[s.uid]["wrong"])
        assert rec.margin == pytest.approx(1.0)


def test_rule_prefers_the_concise_right_answer(planted):
    specs, by_kind, sample_fn, _ = planted
    records, _ = build_onpolicy_pairs(specs, sample_fn, 4, lambda sp, ans: label_answers("rule", sp, ans))
    for rec, s in zip(records, specs, strict=True):
        assert rec.chosen == by_kind[s.uid]["correct"]  # right and concise beats right and verbose
        assert rec.rejected in (by_kind[s.uid]["wrong"], by_kind[s.uid]["off_topic"])


def test_noise_free_annotators_agree_with_the_rule_and_k_limits_the_candidates(planted):
    specs, by_kind, sample_fn, calls = planted
    records, facts = build_onpolicy_pairs(
        specs, sample_fn, 2, lambda sp, ans: label_answers("annotators", sp, ans, noise=0.0), 0.0
    )
    assert calls[-1] == 2 and facts["answers"] == 2 * len(specs)
    for rec, s in zip(records, specs, strict=True):  # k=2: only wrong and verbose were drawn
        assert (rec.chosen, rec.rejected) == (by_kind[s.uid]["verbose"], by_kind[s.uid]["wrong"])


class LengthLovingRM:
    """A planted reward model that pays for characters: the length control must undo it."""

    def score(self, prompts, texts):
        return [float(len(t)) for t in texts]


def test_rm_length_control(planted):
    specs, by_kind, sample_fn, _ = planted
    answers = sample_fn(specs, 4)
    raw = label_answers("rm", specs, answers, LengthLovingRM())
    controlled = label_answers("rm", specs, answers, LengthLovingRM(), length_penalty=2.0)
    s = specs[0]
    assert raw[s.uid] == [float(len(t)) for t in answers[s.uid]]
    assert controlled[s.uid] == [-float(len(t)) for t in answers[s.uid]]
    recs, _ = best_worst_records(specs, answers, controlled, 0.0, "rm")
    shortest = min(answers[s.uid], key=len)
    assert recs[0].chosen == shortest


def test_sampler_must_return_k_answers(planted):
    specs, _, sample_fn, _ = planted
    with pytest.raises(ValueError, match="other than 3 answers"):
        build_onpolicy_pairs(specs, lambda sp, k: sample_fn(sp, 2), 3, lambda sp, ans: {})
    with pytest.raises(ValueError, match="k must be >= 2"):
        build_onpolicy_pairs(specs, sample_fn, 1, lambda sp, ans: {})


def test_sample_k_draws_k_answers_per_prompt_from_a_policy(tiny_tokenizer, tmp_path):
    from glmwb.pretrain.hf import save_pretrained

    folder = save_pretrained(tiny_glm(tiny_tokenizer, seed=5), tmp_path / "policy", tiny_tokenizer)
    world = make_world(seed=0, num_entities=24)
    specs = world_specs(world, "dev", 3, seed=0)
    got = sample_k(specs, str(folder), k=3, max_new_tokens=4, seed=0)
    assert set(got) == {s.uid for s in specs} and all(len(v) == 3 for v in got.values())
    assert got == sample_k(specs, str(folder), k=3, max_new_tokens=4, seed=0)  # seeded
