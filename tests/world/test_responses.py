"""Candidate answers: each kind checks as labelled; minimal pairs differ from one sentence in one thing only."""

from __future__ import annotations

from glmwb.pretrain.world import Prompt, World, check
from glmwb.pretrain.world.responses import KINDS


def test_responses_check_as_labelled(world: World, train: list[Prompt], heldout: list[Prompt]) -> None:
    for p in train[:300] + heldout[:100]:
        responses = world.responses(p, seed=7)
        assert [r.kind for r in responses] == list(KINDS)
        checks = {r.kind: world.check(p, r.text) for r in responses}
        assert (
            checks["correct"].correct and checks["correct"].right_language and checks["correct"].score == 1.0
        )
        assert (
            checks["verbose"].correct
            and checks["verbose"].right_language
            and checks["verbose"].concision <= 0.6
        )
        assert not checks["wrong"].correct and checks["wrong"].right_language
        assert checks["wrong_language"].correct and not checks["wrong_language"].right_language
        assert not checks["refusal"].correct and not checks["off_topic"].correct
        assert (
            checks["correct"].score
            > checks["verbose"].score
            > checks["wrong_language"].score
            > checks["wrong"].score
        )
        assert all(0.0 <= c.score <= 1.0 for c in checks.values())
        assert world.check(p, p.reference).score == 1.0
        assert check(p, responses[0].text) == checks["correct"]  # the world-free checker agrees


def test_contrast_responses_change_one_thing(world: World, train: list[Prompt]) -> None:
    checked = 0
    for prompt in train[:60]:
        r = world.contrast_responses(prompt, seed=5)
        correct, wrong = r["correct"].text, r["wrong"].text
        # filler and the other language wrap the wrong value exactly as they wrap the right one
        assert r["verbose_wrong"].text == r["verbose"].text.replace(correct, wrong)
        assert correct in r["verbose"].text and wrong in r["verbose_wrong"].text
        checks = {k: world.check(prompt, v.text) for k, v in r.items()}
        assert [k for k, c in checks.items() if c.correct] == [
            "correct",
            "verbose",
            "wrong_language",
            "terse",
        ]
        # the bare value, right and wrong: as concise as it gets, right language (numbers have none)
        assert r["terse"].text.rstrip(".。").lower() in correct.lower()
        assert r["terse_wrong"].text.rstrip(".。").lower() in wrong.lower()
        assert checks["terse"].score == 1.0 and checks["terse_wrong"].right_language
        # another subject's own true sentence: wrong here, and never a held-out fact
        other = r["other_subject"].text
        assert other != correct and not checks["other_subject"].correct
        if prompt.family == "fact":
            spec = world.item_of(prompt).spec
            about = [
                it
                for it in world.items["fact"]
                if it.spec == spec and world.by_name[dict(it.slots)["n"]].name(prompt.lang) in other
            ]
            assert about and not any(world.is_heldout(it) for it in about), (other, about)
            assert any(world.fill("{v}", it, prompt.lang) in other for it in about)  # its own value
        # a true sentence about the same subject that answers another question, and that value alone: wrong
        assert not checks["other_attribute"].correct and not checks["terse_other"].correct
        item = world.item_of(prompt)
        other_items = [
            it for it in world.items[prompt.family] if it.slots == item.slots and it.spec != item.spec
        ]
        if prompt.family == "fact" and any(not world.is_heldout(it) for it in other_items):
            name = world.by_name[dict(item.slots)["n"]].name(prompt.lang)
            assert name in r["other_attribute"].text and r["other_attribute"].text != correct
            told = [
                it for it in other_items if world.fill("{v}", it, prompt.lang) in r["other_attribute"].text
            ]
            assert told and not any(world.is_heldout(it) for it in told), r["other_attribute"].text
            assert r["terse_other"].text.rstrip(".。").lower() in r["other_attribute"].text.lower()
            checked += 1
        assert (
            not checks["wrong_language"].right_language and not checks["wrong_language_wrong"].right_language
        )
        assert checks["wrong_language"].answer != checks["wrong_language_wrong"].answer
    assert checked > 10  # most facts' subjects have another training-split fact
