"""Tasks: prompts from JSONL / datasets / the world, K sampled answers per prompt from a tiny GLM folder
(with provenance), pre-generated answers, items; and the CLI end to end on the embedded world."""

from __future__ import annotations

import json

import pytest

from glmwb.annotation import tasks
from glmwb.annotation.store import Store
from glmwb.recipes.cli import main as glmwb
from tests.annotation.conftest import cheap_hasher


def test_sample_k_answers_per_prompt_with_provenance(tiny_glm_folder, tiny_tokenizer):
    prompts = tasks.load_prompts("world:train:5")
    config = tasks.SamplingConfig(k=3, max_new_tokens=6, temperature=1.0, top_p=1.0, batch_size=4, seed=1)
    answers = tasks.sample_responses(prompts, tiny_glm_folder, config, model_name="tiny", progress=False)
    assert set(answers) == {p.uid for p in prompts}
    template = tasks.chat_template_sha256(tiny_tokenizer)
    assert template is not None and len(template) == 64
    for p in prompts:
        assert len(answers[p.uid]) == 3
        for j, r in enumerate(answers[p.uid]):
            assert r.model == "tiny" and r.checkpoint == str(tiny_glm_folder.resolve())
            assert r.chat_template_sha256 == template
            assert r.sampling["temperature"] == 1.0 and r.sampling["k"] == 3 and r.sampling["sample"] == j
            assert 1 <= r.meta["tokens"] <= 6
    # 15 sequences in batches of 4: 4 batches, each with its own recorded seed; reruns are identical
    assert len({r.sampling["seed"] for rs in answers.values() for r in rs}) == 4
    again = tasks.sample_responses(prompts, tiny_glm_folder, config, model_name="tiny", progress=False)
    assert [r.text for r in again[prompts[0].uid]] == [r.text for r in answers[prompts[0].uid]]


def test_items_from_samples_into_the_store(tiny_glm_folder, sqlite_store):
    prompts = tasks.load_prompts("world:heldout:4")
    config = tasks.SamplingConfig(k=4, max_new_tokens=8, temperature=1.5, batch_size=8)
    answers = tasks.sample_responses(prompts, tiny_glm_folder, config, progress=False)
    items = tasks.make_items(prompts, answers, per_item=2, items_per_prompt=2, overlap=2, batch="r1")
    assert items and all(len(i.responses) == 2 and i.responses[0].text != i.responses[1].text for i in items)
    ids = sqlite_store.add_items(items)
    stored = sqlite_store.items(ids)
    r = stored[ids[0]].responses[0]
    assert r.chat_template_sha256 and r.sampling["max_new_tokens"] == 8 and r.checkpoint
    assert stored[ids[0]].prompt_meta["world_prompt"]["id"] == stored[ids[0]].prompt_uid


def test_make_items_groups_priority_and_dedup():
    prompts = [tasks.PromptSpec("p1", [{"role": "user", "content": "q"}])]
    from glmwb.annotation.store import NewResponse

    answers = {"p1": [NewResponse(t, "m") for t in ("a", "b", "a", "c", " ")]}  # duplicate and blank dropped
    every = tasks.make_items(prompts, answers, per_item=2, items_per_prompt=0)
    assert sorted(tuple(r.text for r in i.responses) for i in every) == [("a", "b"), ("a", "c"), ("b", "c")]
    scored = tasks.make_items(prompts, answers, per_item=3, priority_fn=lambda p, texts: float(len(texts)))
    assert len(scored) == 1 and scored[0].priority == 3.0


def test_prompt_sources(tmp_path):
    rows = [
        {"id": "q1", "prompt": "Hello?", "lang": "en"},
        {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    specs = tasks.load_prompts(str(path))
    assert specs[0].uid == "q1" and specs[0].messages == [{"role": "user", "content": "Hello?"}]
    assert specs[0].meta == {"lang": "en"} and specs[1].uid.startswith("p-")
    import datasets

    datasets.Dataset.from_list([{"prompt": "A?"}, {"prompt": "B?"}]).save_to_disk(str(tmp_path / "ds"))
    assert [s.messages[0]["content"] for s in tasks.load_prompts(str(tmp_path / "ds"))] == ["A?", "B?"]
    world = tasks.load_prompts("world:heldout:7")
    assert len(world) == 7 and all(s.meta["world_prompt"]["id"] == s.uid for s in world)
    with pytest.raises(ValueError, match="row 1"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"text": "no prompt here"}\n')
        tasks.load_prompts(str(bad))


def test_pregenerated_answers(tmp_path):
    path = tmp_path / "answers.jsonl"
    rows = [
        {"id": "x", "prompt": "2+2?", "responses": ["4", {"text": "5", "model": "m2", "sampling": {"t": 1}}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts, answers = tasks.read_responses(path)
    assert prompts[0].uid == "x" and [r.text for r in answers["x"]] == ["4", "5"]
    assert answers["x"][1].model == "m2" and answers["x"][1].sampling == {"t": 1}


def test_world_items_have_right_gold(sqlite_store):
    from glmwb.annotation.annotators import PreferenceRule
    from glmwb.pretrain.world import Prompt, check

    items = tasks.world_items(10, gold=5, overlap=2)
    assert sum(i.gold is not None for i in items) == 5
    rule = PreferenceRule()
    for item in items[:5]:
        prompt = Prompt.from_dict(item.prompt_meta["world_prompt"])
        a, b = (check(prompt, r.text) for r in item.responses)
        assert item.gold == {"A": 0, "B": 1}.get(rule.label(a, b), rule.label(a, b))
    ids = sqlite_store.add_items(items)
    stored = sqlite_store.items(ids)
    for item, item_id in zip(items[:5], ids[:5], strict=True):
        letter = stored[item_id].gold_choice  # recorded in display order
        winner = next(r for r in stored[item_id].responses if r.letter == letter)
        assert winner.text == item.responses[item.gold].text


def test_cli_end_to_end_on_the_world(tmp_path, capsys, monkeypatch):
    db = f"sqlite:///{tmp_path / 'a.db'}"
    assert (
        glmwb(["annotation", "add-tasks", "--db", db, "--world", "30", "--gold", "5", "--overlap", "3"]) == 0
    )
    assert (
        glmwb(
            [
                "annotation",
                "simulate",
                "--db",
                db,
                "--annotators",
                "s0",
                "s1",
                "s2",
                "--noise",
                "0.1",
                "--strength",
            ]
        )
        == 0
    )
    assert glmwb(["annotation", "report", "--db", db, "--json"]) == 0
    report = json.loads(capsys.readouterr().out.split("\n", 2)[-1])
    assert report["overview"]["complete_items"] == 30
    assert report["agreement"]["krippendorff_alpha"] > 0.6  # 10 % noise: strong agreement
    out = tmp_path / "prefs.parquet"
    assert glmwb(["annotation", "export", "--db", db, "--out", str(out)]) == 0
    from glmwb.annotation.preference_data import read_preferences

    records = read_preferences(out).records
    assert len(records) >= 25
    # every strict row carries its winners' mean strength as a margin in [0, 1]; ties none
    assert all((r.margin is None) == r.tie for r in records)
    assert all(0.0 <= r.margin <= 1.0 for r in records if not r.tie)
    monkeypatch.setenv("NEW_PASSWORD", "a-long-password")
    assert (
        glmwb(
            [
                "annotation",
                "create-user",
                "--db",
                db,
                "boss",
                "--role",
                "admin",
                "--password-env",
                "NEW_PASSWORD",
            ]
        )
        == 0
    )
    store = Store(db, password_hasher=cheap_hasher())
    assert store.authenticate("boss", "a-long-password").is_admin
    store.close()
    store_session = Store(db, password_hasher=cheap_hasher())
    token = store_session.create_session(store_session.annotator("boss"))
    monkeypatch.setenv("NEW_PASSWORD", "another-long-password")
    assert glmwb(["annotation", "set-password", "--db", db, "boss", "--password-env", "NEW_PASSWORD"]) == 0
    assert store_session.annotator_for_token(token) is None  # the new password ended the session
    assert store_session.authenticate("boss", "another-long-password").is_admin
    store_session.close()
    # user mistakes: one line, exit code 2
    assert glmwb(["annotation", "set-password", "--db", db, "nobody", "--password-env", "NEW_PASSWORD"]) == 2
    assert "no user 'nobody'" in capsys.readouterr().err
    assert glmwb(["annotation", "create-user", "--db", db, "boss", "--password-env", "NEW_PASSWORD"]) == 2
    assert "exists already" in capsys.readouterr().err
    assert glmwb(["annotation", "add-tasks", "--db", db, "--prompts", "world"]) == 2


def test_the_server_binds_loopback_by_default():
    from glmwb.recipes.cli import make_parser

    args = make_parser().parse_args(["annotate"])
    assert (args.host, args.port) == ("127.0.0.1", 7860)
