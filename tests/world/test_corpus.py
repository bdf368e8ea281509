"""The pretraining corpus: chats ask only train questions; size, speed, languages and chat markup."""

from __future__ import annotations

import re
import time

from glmwb.pretrain.world import Prompt, World

CJK = re.compile(r"[\u4e00-\u9fff]")


def test_corpus_chats_never_ask_heldout_questions(world: World, heldout: list[Prompt]) -> None:
    docs = world.corpus(3000, seed=0)
    asked = set(
        re.findall(r"<\|user\|>\n(.*?)<\|assistant\|>", "".join(d for d in docs if d.startswith("[gMASK]")))
    )
    assert len(asked) > 500
    assert not asked & {p.messages[-1]["content"] for p in heldout}
    train = world.prompts("train", 2000, seed=1)
    assert asked & {p.messages[-1]["content"] for p in train}  # ...while train questions do occur


def test_corpus_size_speed_languages_and_format(world: World) -> None:
    start = time.perf_counter()
    docs = world.corpus(20000, seed=0)
    seconds = time.perf_counter() - start
    chars = sum(map(len, docs))
    assert seconds < 5.0, seconds
    assert 1_000_000 <= chars <= 3_000_000, chars
    cjk_docs = sum(bool(CJK.search(d)) for d in docs)
    assert 0.45 < cjk_docs / len(docs) < 0.55
    for d in docs[:2000]:
        # A document is English or Chinese, not a mixture (a chat's wrong-language answers aside).
        text = "".join(re.findall(r"<\|user\|>\n([^<]*)", d)) if d.startswith("[gMASK]") else d
        cjk, latin = len(CJK.findall(text)), len(re.findall(r"[A-Za-z]", text))
        assert (cjk == 0) or (cjk > latin), d
    chats = [d for d in docs if "<|assistant|>" in d]
    assert 0.3 < len(chats) / len(docs) < 0.55
    for d in chats[:500]:
        assert d.startswith("[gMASK]<sop>") and d.count("[gMASK]") == 1
        assert re.fullmatch(
            r"\[gMASK\]<sop>(<\|system\|>\n[^\n<]+)?(<\|user\|>\n[^<]+<\|assistant\|>\n[^<]+)+", d
        ), d
        assert not d.endswith("\n") and "<|endoftext|>" not in d
