"""Readers (our JSONL, TRL's formats, HH-RLHF transcripts, OASST-zh pairs, the store's export, datasets),
errors that name the file / row / field, tokenisation with the chat template, truncation, reliability."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from glmwb.annotation.preference_data import parse_hh_transcript, read_preferences
from glmwb.annotation.records import PreferenceDataError, PreferenceRecord
from glmwb.pretrain.tokenizer import encode_chat, encode_response
from glmwb.rewards.data import (
    IGNORE_LABEL,
    annotator_reliability,
    encode_pairs,
    head_labels,
    reliability_weights,
    truncate,
)
from tests.shared_data import SHARED_DATA

DATA = SHARED_DATA
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not beside the checkout")


def _write_jsonl(path: Path, rows: list) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


def test_preference_jsonl_strings_messages_and_export(tmp_path: Path) -> None:
    rows = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {
            "prompt": [{"role": "system", "content": "terse"}, {"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "assistant", "content": "go away"}],
            "tie": True,
            "annotator": "ann",
            "weight": 0.5,
            "margin": 2,
            "attributes": {"helpfulness": 1},
        },
    ]
    records = read_preferences(_write_jsonl(tmp_path / "p.jsonl.gz", rows)).records
    assert records[0].prompt == ({"role": "user", "content": "2+2?"},) and records[0].chosen == "4"
    assert (
        records[1].tie
        and records[1].weight == 0.5
        and records[1].margin == 2.0
        and records[1].chosen == "hello"
    )
    # the store's export is PreferenceRecord.to_dict() per line: read back unchanged
    export = _write_jsonl(tmp_path / "export.jsonl", [r.to_dict() for r in records])
    assert read_preferences(export).records == records


def test_implicit_prompt_conversations(tmp_path: Path) -> None:
    user = {"role": "user", "content": "Which is bigger, 3 or 5?"}
    row = {
        "chosen": [user, {"role": "assistant", "content": "5"}],
        "rejected": [user, {"role": "assistant", "content": "3"}],
    }
    (r,) = read_preferences([row]).records
    assert r.prompt == (user,) and (r.chosen, r.rejected) == ("5", "3")


def test_datasets_folder_and_parquet(tmp_path: Path) -> None:
    import datasets

    rows = [{"prompt": "q", "chosen": "a", "rejected": "b", "attributes": {"x": 1}},
            {"prompt": "q2", "chosen": "c", "rejected": "d", "attributes": {"y": -1}}]  # fmt: skip
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "ds"))
    ds.to_parquet(str(tmp_path / "p.parquet"))
    for source in (tmp_path / "ds", tmp_path / "p.parquet", ds):
        records = read_preferences(source).records
        assert [r.chosen for r in records] == ["a", "c"]
        assert records[0].attributes == {"x": 1} and records[1].attributes == {
            "y": -1
        }  # Arrow's None-filled keys


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "q", "chosen": "a"}, "row 2: missing field 'rejected'"),
        ({"prompt": "q", "chosen": "   ", "rejected": "b"}, "row 2: field 'chosen' is an empty response"),
        ({"prompt": "q", "chosen": 3, "rejected": "b"}, "row 2: field 'chosen' must be a string"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "row 2: field 'prompt' is empty"),
        (
            {"prompt": [{"role": "bot", "content": "x"}], "chosen": "a", "rejected": "b"},
            "row 2: field 'prompt'[0].role",
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b", "tie": "yes"},
            "row 2: field 'tie' must be true or false",
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b", "weight": -1},
            "row 2: field 'weight' must be a finite number >= 0",
        ),
        (
            '{"prompt": "q", "chosen": "a", "rejected": "b", "weight": Infinity}',
            "field 'weight' must be a finite",
        ),
        ('{"prompt": "q", "chosen": "a", "rejected": "b", "margin": NaN}', "field 'margin' must be a finite"),
        (
            {"prompt": [{"role": "user", "content": 7}], "chosen": "a", "rejected": "b"},
            "field 'prompt'[0].content must be text, got int",
        ),
        (
            {"prompt": [{"role": "user", "content": None}], "chosen": "a", "rejected": "b"},
            "field 'prompt'[0].content must be text, got NoneType",
        ),
        (
            {"prompt": [{"role": "user", "content": " "}], "chosen": "a", "rejected": "b"},
            "field 'prompt'[0].content is empty",
        ),
        (
            {"prompt": "q", "chosen": "same", "rejected": "same"},
            "'chosen' and 'rejected' are the same text in a pair that is not a tie",
        ),
        (
            {"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
            "field 'chosen' is a 'user' message",
        ),
        (
            {
                "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}],
                "chosen": "a",
                "rejected": "b",
            },
            "field 'prompt' ends with an assistant turn",
        ),  # fmt: skip
        ('{"prompt": "q", "chosen": "a\\ud800", "rejected": "b"}', "field 'chosen' has a lone surrogate"),
        ([1, 2], "row 2: a row must be a JSON object"),
        ("{not json", "row 2 (line 2): not JSON"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path: Path, row, message: str) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(PreferenceDataError) as e:
        read_preferences(path, format="preference")
    assert str(path) in str(e.value) and message in str(e.value)
    res = read_preferences(path, format="preference", skip_invalid=True)
    assert len(res.records) == 1 and len(res.skipped) == 1 and message in res.skipped[0]


def test_hh_transcripts_split_into_messages() -> None:
    text = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: 4"
    assert parse_hh_transcript(text, "x", "chosen") == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    row = {"chosen": text, "rejected": text.replace("Assistant: 4", "Assistant: 5")}
    (r,) = read_preferences([row], name="hh.jsonl").records
    assert len(r.prompt) == 3 and (r.chosen, r.rejected) == ("4", "5") and r.provenance["source"] == "hh_rlhf"
    bad = {"chosen": text, "rejected": "\n\nHuman: Other\n\nAssistant: 5"}
    with pytest.raises(PreferenceDataError, match=r"hh.jsonl, row 2: fields 'chosen' and 'rejected' differ"):
        read_preferences([row, bad], format="hh_rlhf", name="hh.jsonl")
    with pytest.raises(PreferenceDataError, match=r"row 1: field 'rejected' is an empty response"):
        read_preferences([{"chosen": text, "rejected": text[: text.rindex("4")]}], format="hh_rlhf")


@needs_data
def test_real_hh_rlhf_slice() -> None:
    res = read_preferences(DATA / "hh_rlhf" / "helpful-base" / "test.jsonl.gz", skip_invalid=True, limit=200)
    assert len(res.records) == 200
    assert all(r.prompt[-1]["role"] == "user" and r.prompt[0]["role"] == "user" for r in res.records)
    assert all(m["role"] in ("user", "assistant") for r in res.records for m in r.prompt)
    # rows 121 (an empty assistant turn and an empty rejected answer) and 169 (the transcripts differ
    # earlier) are reported, not read
    assert any("row 121: field 'prompt'[3].content is empty" in s for s in res.skipped)
    assert any("row 169" in s for s in res.skipped)
    with pytest.raises(
        PreferenceDataError, match=r"test.jsonl.gz, row 121: field 'prompt'\[3\].content is empty"
    ):
        read_preferences(DATA / "hh_rlhf" / "helpful-base" / "test.jsonl.gz", limit=200)


@needs_data
def test_real_oasst_zh_pairs_slice() -> None:
    path = DATA / "zh_preference" / "oasst_rm_zh" / "oasst_rm_zh_pairs.jsonl"
    records = read_preferences(path, limit=300).records
    assert len(records) == 300
    assert all(r.margin is not None and r.margin >= 1 for r in records)
    multi = [r for r in records if len(r.prompt) > 1]
    assert multi and all([m["role"] for m in r.prompt][-2:] == ["assistant", "user"] for r in multi)


def test_encode_response_matches_encode_chat_and_ends_with_the_terminator(tiny_tokenizer) -> None:
    prompts = [
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "你好"},
         {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "quote <|user|> please"}],
    ]  # fmt: skip
    eos = tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for prompt in prompts:
        response = "A reply with a control token <|endoftext|> inside."
        ids = encode_response(tiny_tokenizer, prompt, response)
        assert (
            ids
            == encode_chat(tiny_tokenizer, [*prompt, {"role": "assistant", "content": response}])["input_ids"]
        )
        assert ids[-1] == eos and ids.count(eos) == 1  # the text's control token is escaped
        assert tiny_tokenizer.decode(ids[:2]) == "[gMASK]<sop>" and ids.count(ids[0]) == 1  # not doubled


def test_truncation_policies(tiny_tokenizer) -> None:
    ids = list(range(20))
    assert truncate(ids, 30, "left", "x") == ids
    assert truncate(ids, 8, "left", "x") == [0, 1, 14, 15, 16, 17, 18, 19]
    assert truncate(ids, 8, "drop", "x") is None
    with pytest.raises(PreferenceDataError, match="data, row 7: 20 tokens > max_length 8"):
        truncate(ids, 8, "error", "data, row 7")
    long = PreferenceRecord.from_dict({"prompt": "word " * 200, "chosen": "a", "rejected": "b"})
    short = PreferenceRecord.from_dict({"prompt": "q", "chosen": "a", "rejected": "b"})
    pairs, stats = encode_pairs(tiny_tokenizer, [short, long], 32, "drop")
    assert stats["dropped_too_long"] == 1 and len(pairs) == 1
    pairs, stats = encode_pairs(tiny_tokenizer, [short, long], 32, "left")
    assert stats["truncated"] == 2 and len(pairs[1].chosen_ids) == 32
    assert pairs[1].chosen_ids[-1] == tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    with pytest.raises(PreferenceDataError, match="train, row 2: .* > max_length 32"):
        encode_pairs(tiny_tokenizer, [short, long], 32, "error", name="train")


def test_head_labels() -> None:
    r = PreferenceRecord.from_dict(
        {"prompt": "q", "chosen": "a", "rejected": "b", "attributes": {"correctness": -1}}
    )
    assert head_labels(r, ["reward", "correctness", "language"]) == (1, -1, IGNORE_LABEL)
    tie = PreferenceRecord.from_dict({"prompt": "q", "chosen": "a", "rejected": "b", "tie": True})
    assert head_labels(tie, ["reward"]) == (0,)


def test_annotator_reliability_ranks_careless_annotators_last() -> None:
    from glmwb.annotation.annotators import preference_pairs
    from glmwb.pretrain.world import make_world

    world = make_world(seed=0)
    rows = preference_pairs(world, world.prompts("train", 400), n_annotators=3, noise=[0.0, 0.1, 0.8],
                            labels_per_pair=3)  # fmt: skip
    records = [PreferenceRecord.from_dict(r) for r in rows]
    rel = annotator_reliability(records)
    assert rel["sim-0"] > rel["sim-1"] > rel["sim-2"] and rel["sim-2"] < 0.6 < rel["sim-1"]
    weighted = reliability_weights(records, rel)
    w = {r.annotator: r.weight for r in weighted}
    assert w["sim-0"] > w["sim-1"] > w["sim-2"] >= 0.05
