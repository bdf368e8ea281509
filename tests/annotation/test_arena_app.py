"""The arena's shared state without a browser: the vote guard (not while answering, once per battle, not
after a failure), pairs drawn uniformly until the counted votes can be fitted and then by
``ratings.next_pair`` with its probability and weight stored with the vote, and the leaderboard text."""

from __future__ import annotations

import pytest

from glmwb.annotation.ratings import battles_from_store
from glmwb.annotation.store import Store
from glmwb.pretrain.chat_sources import (
    AnswerStream,
    BatchingGenerator,
    LocalChatModel,
    OpenAIChatModel,
    Sampling,
)
from glmwb.ui.arena import Arena, ArenaConfig, ArenaRefusal
from tests.annotation.conftest import cheap_hasher, free_port
from tests.tiny import one_thread  # noqa: F401 (autouse)

NAMES = ("m0", "m1", "m2")


@pytest.fixture(scope="module")
def generator(tiny_glm_folder):
    g = BatchingGenerator(tiny_glm_folder, max_wait_s=0.0)
    yield g
    g.close()


@pytest.fixture
def arena(generator, tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'arena.db'}", password_hasher=cheap_hasher())
    store.create_annotator("alice", "alice-password")
    config = ArenaConfig(sampling=Sampling(temperature=0.0, max_new_tokens=4), per_minute=1000, seed=1)
    yield Arena(store, [LocalChatModel(n, generator) for n in NAMES], config)
    store.close()


def play(arena: Arena, prompt: str = "Hello there", mode: str = "anonymous", picks=None):
    live = arena.new_battle("alice", mode, picks)
    arena.start_turn(live, "alice", regenerate=False)
    for _ in arena.answer(live, prompt):
        pass
    return live


def test_votes_are_refused_while_answering_twice_or_after_a_failure(arena):
    alice = arena.store.annotator("alice")
    live = arena.new_battle("alice", "anonymous")
    with pytest.raises(ArenaRefusal, match="send a prompt first"):
        arena.vote(live, alice, "A")
    arena.start_turn(live, "alice", regenerate=False)
    pieces = arena.answer(live, "Hello there")
    next(pieces)  # the models are writing
    with pytest.raises(ArenaRefusal, match="both answers must be complete"):
        arena.vote(live, alice, "A")
    with pytest.raises(ArenaRefusal, match="still answering"):
        arena.start_turn(live, "alice", regenerate=False)
    for _ in pieces:
        pass
    receipt = arena.vote(live, alice, "tie")
    assert receipt.created and arena.store.counts()["votes"] == 1
    with pytest.raises(ArenaRefusal, match="voted on this battle already"):
        arena.vote(live, alice, "A")
    with pytest.raises(ArenaRefusal, match="has its vote"):
        arena.start_turn(live, "alice", regenerate=False)
    assert arena.battle(live.battle.battle_id, "bob") is None  # nobody else's


def test_a_failed_model_makes_the_battle_unjudgeable(arena, generator):
    dead = OpenAIChatModel("dead", f"http://127.0.0.1:{free_port()}/v1", "x", timeout_s=5)
    arena.models["dead"] = type(arena.models["m0"])(dead)
    live = play(arena, mode="named", picks=("m0", "dead"))
    assert "no answer from" in live.failed
    with pytest.raises(ArenaRefusal, match="cannot be judged"):
        arena.vote(live, arena.store.annotator("alice"), "A")
    assert arena.store.counts()["votes"] == 0


def test_pairs_are_uniform_until_a_fit_then_chosen_by_next_pair(arena, monkeypatch):
    alice = arena.store.annotator("alice")
    first = arena.new_battle("alice", "anonymous")
    assert first.battle.pair_prob == pytest.approx(1 / 3) and first.battle.weight == 1.0
    for i in range(9):  # m0 beats m1 beats m2, through counted anonymous votes
        live = play(arena, prompt=f"question {i}")
        b = live.battle
        rank = {n: NAMES.index(n) for n in NAMES}
        arena.vote(live, alice, "A" if rank[b.left.model] < rank[b.right.model] else "B")
    seen = []
    import glmwb.annotation.ratings as ratings

    real = ratings.next_pair

    def spy(lb, models, rng=None, explore=0.2):
        choice = real(lb, models, rng, explore)
        seen.append(choice)
        return choice

    monkeypatch.setattr(ratings, "next_pair", spy)
    live = play(arena, prompt="one more")
    assert len(seen) == 1 and arena.pair_leaderboard() is not None
    choice = seen[0]
    assert {live.battle.left.model, live.battle.right.model} == {choice.model_a, choice.model_b}
    assert (live.battle.pair_prob, live.battle.weight) == (choice.prob, choice.weight)
    arena.vote(live, alice, "A")
    (last,) = [
        b
        for b in battles_from_store(arena.store, arena_only=True)
        if b.id == f"arena-{live.battle.battle_id}"
    ]
    assert last.weight == pytest.approx(choice.weight) and last.pair_prob == pytest.approx(choice.prob)
    assert last.model_a == live.battle.left.model  # left is model_a
    board, plot = arena.leaderboard()
    assert board.index("| m0 |") < board.index("| m2 |") and "10** counted votes" in board
    assert "Position bias" in board and plot.endswith(".png")
    from pathlib import Path

    assert Path(plot).read_bytes()[:4] == b"\x89PNG"
    assert arena.leaderboard() == (board, plot)  # no new votes: no refit


def test_an_answer_stream_reports_errors_to_its_reader():
    s = AnswerStream()
    s.put("partial ")
    s.fail("the endpoint went away")
    with pytest.raises(Exception, match="went away"):
        s.read()
    assert s.text == "partial " and s.error == "the endpoint went away"


class Silent:
    """A model that ends its turn at once (an empty answer)."""

    name, checkpoint, chat_template_sha256 = "silent", None, None

    def stream(self, messages, sampling) -> AnswerStream:
        out = AnswerStream()
        out.finish("stop", 0)
        return out


def test_an_empty_answer_cannot_be_judged_until_regenerated(arena):
    from glmwb.ui.arena import ArenaModel

    arena.models["silent"] = ArenaModel(Silent())
    live = play(arena, mode="named", picks=("m0", "silent"))
    with pytest.raises(ArenaRefusal, match="Model B gave an empty answer"):
        arena.vote(live, arena.store.annotator("alice"), "A")
    assert arena.store.counts()["votes"] == 0
    arena.models["silent"] = ArenaModel(LocalChatModel("silent", arena.models["m0"].source.generator))
    arena.start_turn(live, "alice", regenerate=True)
    for _ in arena.answer(live, None):
        pass
    assert live.battle.right.answer and live.battle.regenerations == 1 and live.battle.turns == 1
    assert arena.vote(live, arena.store.annotator("alice"), "B").created
