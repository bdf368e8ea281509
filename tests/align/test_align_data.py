"""align/data.py: world conversations and prompts, SFT file readers, the assistant-token mask, tool calls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glmwb.align.data import (
    Conversation,
    SFTDataError,
    encode_conversation,
    parse_assistant_text,
    prompt_messages,
    read_sft,
    world_prompts,
    world_sft_conversations,
)
from glmwb.pretrain.world import make_world
from tests.shared_data import SHARED_DATA

SHARED = SHARED_DATA
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"real data folder {SHARED} is absent")

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


@pytest.fixture(scope="module")
def world():
    return make_world(seed=0, num_entities=96)


def masked_spans(tok, enc: dict) -> list[str]:
    """The decoded runs of consecutive tokens whose mask is 1 (special tokens kept)."""
    spans, current = [], []
    for token, bit in zip(enc["input_ids"], enc["assistant_masks"], strict=True):
        if bit:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tok.decode(s, skip_special_tokens=False) for s in spans]


# ----------------------------------------------------------------------------------------------------------
# The world


def test_world_conversations_are_correct_concise_same_language_train_answers(world) -> None:
    convs = world_sft_conversations(world, 300, seed=3)
    assert len(convs) == 300
    train = {p.messages[-1]["content"]: p for p in world.prompts("train", 9108, seed=0)}
    heldout = {p.messages[-1]["content"] for p in world.prompts("heldout", 3192, seed=0)}
    multi = 0
    seen = set()
    for messages in convs:
        assert [m["role"] for m in messages if m["role"] == "system"] in ([], ["system"])
        assert messages[-1]["role"] == "assistant"
        if any(m["role"] == "system" for m in messages):
            assert messages[0]["role"] == "system"
        pairs = [(q, a) for q, a in zip(messages, messages[1:], strict=False) if q["role"] == "user"]
        assert all(a["role"] == "assistant" for _, a in pairs)
        multi += len(pairs) > 1
        langs = set()
        for q, a in pairs:
            text = q["content"]
            assert text not in heldout and text in train, text
            assert text not in seen  # distinct prompts throughout
            seen.add(text)
            prompt = train[text]
            check = world.check(prompt, a["content"])
            assert check.correct and check.right_language and check.concision == 1.0, (text, a)
            assert a["content"] == prompt.reference  # the default: the reference answer
            langs.add(prompt.lang)
        assert len(langs) == 1  # follow-up questions stay in the conversation's language
    assert 0.1 < multi / len(convs) < 0.3  # multi_turn=0.2
    assert world_sft_conversations(world, 300, seed=3) == convs
    assert world_sft_conversations(world, 300, seed=4) != convs


def test_world_varied_answers_and_heldout_split(world) -> None:
    varied = world_sft_conversations(world, 200, seed=0, answers="varied", multi_turn=0.0)
    refs = world_sft_conversations(world, 200, seed=0, multi_turn=0.0)
    assert [m[:-1] for m in varied] == [m[:-1] for m in refs]  # same questions
    assert sum(a[-1] != b[-1] for a, b in zip(varied, refs, strict=True)) > 50  # other phrasings
    train = {p.messages[-1]["content"]: p for p in world.prompts("train", 9108, seed=0)}
    for messages in varied:
        check = world.check(train[messages[-2]["content"]], messages[-1]["content"])
        assert check.correct and check.right_language
    held = world_sft_conversations(world, 50, seed=0, split="heldout", multi_turn=0.0)
    heldout = {p.messages[-1]["content"] for p in world.prompts("heldout", 3192, seed=0)}
    assert all(m[-2]["content"] in heldout for m in held)
    with pytest.raises(ValueError, match="answers"):
        world_sft_conversations(world, 5, seed=0, answers="best")


def test_world_prompts_and_prompt_messages(world) -> None:
    prompts = world_prompts(world, "heldout", 20, seed=1)
    assert prompts == world.prompts("heldout", 20, seed=1)
    messages = prompt_messages(prompts)
    assert messages == [p.messages for p in prompts]
    messages[0][-1]["content"] = "changed"
    assert prompts[0].messages[-1]["content"] != "changed"  # copies


# ----------------------------------------------------------------------------------------------------------
# The assistant-token mask (what SFT trains on)


def test_mask_covers_assistant_tokens_and_terminators_multi_turn(tiny_tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 7 + 5?"},
        {"role": "assistant", "content": "7 + 5 = 12."},
        {"role": "user", "content": "北京的天气？"},
        {"role": "assistant", "content": "晴。"},
    ]
    enc = encode_conversation(tiny_tokenizer, messages)
    assert masked_spans(tiny_tokenizer, enc) == ["\n7 + 5 = 12.<|user|>", "\n晴。<|endoftext|>"]
    # everything else is context: system, user turns, the <|assistant|> that opens each turn
    unmasked = [t for t, b in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if not b]
    assert tiny_tokenizer.decode(unmasked, skip_special_tokens=False) == (
        "[gMASK]<sop><|system|>\nYou are terse.<|user|>\nWhat is 7 + 5?<|assistant|>\n北京的天气？<|assistant|>"
    )


def test_mask_on_tool_calls_and_observations(tiny_tokenizer) -> None:
    conv = Conversation(
        [
            {"role": "user", "content": "Weather in Beijing?"},
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [call("get_weather", city="北京")],
            },
            {"role": "observation", "content": '{"temp": 20}'},
            {"role": "assistant", "content": "It is 20 degrees."},
            {"role": "user", "content": "And Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="Paris")]},
            {"role": "observation", "content": '{"temp": 15}'},
            {"role": "assistant", "content": "15 degrees."},
        ],
        tools=[WEATHER_TOOL],
    )
    enc = encode_conversation(tiny_tokenizer, conv)
    assert masked_spans(tiny_tokenizer, enc) == [
        '\nLet me check.<|assistant|>get_weather\n{"city": "北京"}<|observation|>',
        "\nIt is 20 degrees.<|user|>",
        'get_weather\n{"city": "Paris"}<|observation|>',
        "\n15 degrees.<|endoftext|>",
    ]
    text = tiny_tokenizer.decode(enc["input_ids"], skip_special_tokens=False)
    assert text.startswith(
        "[gMASK]<sop><|system|>\n你是一个名为 ChatGLM 的人工智能助手。"
    )  # GLM-4's tools turn
    assert "\n# 可用工具\n## get_weather\n" in text
    # the round trip: each generated turn (terminator dropped) parses back to the message it came from
    assistants = [m for m in conv.messages if m["role"] == "assistant"]
    for span, message in zip(masked_spans(tiny_tokenizer, enc), assistants, strict=True):
        body = span.rsplit("<|", 1)[0]
        assert parse_assistant_text(body) == message


def test_parse_assistant_text_plain_parallel_and_non_json() -> None:
    assert parse_assistant_text("\nHello") == {"role": "assistant", "content": "Hello"}
    two = parse_assistant_text('f\n{"a": 1}<|assistant|>g\n{}')
    assert two["content"] == "" and [c["function"]["name"] for c in two["tool_calls"]] == ["f", "g"]
    assert parse_assistant_text("f\nnot json")["tool_calls"][0]["function"]["arguments"] == "not json"
    with pytest.raises(ValueError, match="segment 1"):
        parse_assistant_text("\nHi<|assistant|>\nagain")


# ----------------------------------------------------------------------------------------------------------
# Readers: inline examples


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_alpaca_and_oasst_zh_rows(tmp_path) -> None:
    path = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi.", "input": "", "output": "Hi!", "system": "Be kind."},
        ],
    )
    res = read_sft(path)
    assert res.format == "alpaca" and res.skipped == []
    assert res.conversations[0].messages == [
        {"role": "user", "content": "Add the numbers.\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    assert res.conversations[1].messages[0] == {"role": "system", "content": "Be kind."}
    assert res.conversations[0].where == f"{path}, row 1" and res.conversations[0].tools is None
    oasst = tmp_path / "o.json"
    oasst.write_text(
        json.dumps(
            [{"instruction": "然后呢？", "input": "", "output": "好的。", "history": [["你好", "你好！"]]}]
        ),
        encoding="utf-8",
    )
    res = read_sft(oasst)
    assert res.format == "oasst_zh"
    assert [m["role"] for m in res.conversations[0].messages] == ["user", "assistant", "user", "assistant"]
    assert res.conversations[0].messages[1]["content"] == "你好！"


def test_sharegpt_tool_call_rows(tmp_path, tiny_tokenizer) -> None:
    row = {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {
                "from": "function_call",
                "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}}),
            },
            {"from": "observation", "value": '{"temp": 15}'},
            {"from": "gpt", "value": "15 degrees."},
        ],
        "tools": json.dumps([WEATHER_TOOL["function"]]),
    }
    res = read_sft(write_jsonl(tmp_path / "g.jsonl", [row, {**row, "tools": "[]"}]))
    assert res.format == "sharegpt"
    conv = res.conversations[0]
    assert conv.tools == [WEATHER_TOOL]
    assert conv.messages == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="Paris")]},
        {"role": "observation", "content": '{"temp": 15}'},
        {"role": "assistant", "content": "15 degrees."},
    ]
    assert res.conversations[1].tools is None
    spans = masked_spans(tiny_tokenizer, encode_conversation(tiny_tokenizer, conv))
    assert spans == ['get_weather\n{"city": "Paris"}<|observation|>', "\n15 degrees.<|endoftext|>"]


def test_messages_rows_and_text_then_parallel_calls(tmp_path) -> None:
    row = {
        "messages": [
            {"role": "user", "content": "Two cities?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": '{"city": "A"}'}},
                    call("get_weather", city="B"),
                ],
            },
            {"role": "tool", "content": "1"},
            {"role": "tool", "content": "2"},
            {"role": "assistant", "content": "Both fine."},
        ],
        "tools": [WEATHER_TOOL],
    }
    conv = read_sft(write_jsonl(tmp_path / "m.jsonl", [row])).conversations[0]
    assert conv.messages[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [call("get_weather", city="A"), call("get_weather", city="B")],
    }


def test_glm4_own_message_rows_encode_as_the_openai_form(tmp_path, tiny_tokenizer) -> None:
    """GLM-4's form (tools in the system message, a call as metadata + JSON content, role observation) is read
    as is, not dropped, and gives the same tokens and loss mask as the OpenAI form of the same chat."""
    glm = {
        "messages": [
            {"role": "system", "content": "Be brief.", "tools": [WEATHER_TOOL]},
            {"role": "user", "content": "Weather in A?"},
            {"role": "assistant", "metadata": "get_weather", "content": '{"city": "A"}'},
            {"role": "observation", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."},
        ]
    }
    openai = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in A?"},
            {"role": "assistant", "content": None, "tool_calls": [call("get_weather", city="A")]},
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."},
        ],
        "tools": [WEATHER_TOOL],
    }
    a, b = read_sft(write_jsonl(tmp_path / "chats.jsonl", [glm, openai]), format="messages").conversations
    assert a.messages[2] == {"role": "assistant", "content": '{"city": "A"}', "metadata": "get_weather"}
    assert a.tools == b.tools and a.messages[0] == {"role": "system", "content": "Be brief."}
    enc = encode_conversation(tiny_tokenizer, a)
    assert enc == encode_conversation(tiny_tokenizer, b)
    text = tiny_tokenizer.decode(enc["input_ids"])
    assert '<|assistant|>get_weather\n{"city": "A"}<|observation|>\nsunny' in text and "# 可用工具" in text


BAD_ROWS = [
    ({"instruction": "x", "input": ""}, "row 2: missing field 'output'"),
    ({"instruction": "x", "output": 5}, "row 2: field 'output' must be a string, got int"),
    ({"instruction": "x", "output": "   "}, "row 2: field 'output' is empty"),
    (
        {"instruction": "", "input": "", "output": "y"},
        "row 2: fields 'instruction' and 'input' are both empty",
    ),
    ({"instruction": "x", "output": "y", "history": [["only one"]]}, "row 2: field 'history'[0]"),
    (["not", "an", "object"], "row 2: a row must be a JSON object, got list"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_ROWS)
def test_bad_alpaca_rows_name_file_row_and_field(tmp_path, bad, message) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "ok", "output": "fine"}, bad])
    with pytest.raises(SFTDataError) as e:
        read_sft(path, format="alpaca")
    assert str(path) in str(e.value) and message in str(e.value)
    res = read_sft(path, format="alpaca", skip_invalid=True)
    assert len(res.conversations) == 1 and len(res.skipped) == 1 and message in res.skipped[0]


def _glaive(*turns, tools="[]"):
    return {"conversations": [{"from": f, "value": v} for f, v in turns], "tools": tools}


BAD_SHAREGPT = [
    (_glaive(("human", "hi"), ("robot", "x")), "conversations[1].from must be one of"),
    (_glaive(("human", "hi"), ("function_call", "f(x)")), "conversations[1].value (a function_call) is not JSON"),
    (_glaive(("human", "hi"), ("function_call", '{"arguments": {}}')), "conversations[1].value must be an object"),
    (_glaive(("human", "hi"), ("observation", "{}"), ("gpt", "ok")), "is an observation that follows no tool call"),
    (_glaive(("human", "hi"), ("gpt", 3)), "conversations[1].value must be a string, got int"),
    (_glaive(("human", "hi")), "field 'conversations' has no assistant turn"),
    (_glaive(("human", "hi"), ("gpt", "ok"), tools="[{"), "field 'tools' is a string but not JSON"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}, "messages[1].role must be"),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "system", "content": "s"}]},
        "messages[2] is a system turn that is not the first message",
    ),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "a", "metadata": "f"}]},
        "messages[1].metadata must be a one-line tool name on an assistant message",
    ),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "metadata": "f"}]},
        "messages[1] is a call of 'f' with no arguments",
    ),
    (
        {"messages": [{"role": "user", "content": "q", "tools": []}, {"role": "assistant", "content": "a"}]},
        "messages[0] has tools; they belong in the first (system) message",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("bad", "message"), BAD_SHAREGPT)
def test_bad_chat_rows_name_row_and_field(tmp_path, bad, message) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [bad])
    with pytest.raises(SFTDataError) as e:
        read_sft(path)
    assert f"{path}, row 1" in str(e.value) and message in str(e.value)


def test_file_level_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="SFT data not found"):
        read_sft(tmp_path / "missing.jsonl")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{not json\n', encoding="utf-8")
    with pytest.raises(SFTDataError, match=r"row 2 \(line 2\): not JSON"):
        read_sft(broken)
    assert len(read_sft(broken, skip_invalid=True).conversations) == 1
    unknown = write_jsonl(tmp_path / "u.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(SFTDataError, match="cannot tell the SFT format"):
        read_sft(unknown)
    empty = write_jsonl(tmp_path / "e.jsonl", [{"instruction": "q", "output": ""}])
    with pytest.raises(SFTDataError, match="no usable conversations"):
        read_sft(empty, skip_invalid=True)
    with pytest.raises(ValueError, match="format must be one of"):
        read_sft(unknown, format="csv")


# ----------------------------------------------------------------------------------------------------------
# Readers: the real files in ../shared/data


@needs_shared
@pytest.mark.parametrize(
    ("rel", "fmt", "n", "skipped"),
    [
        ("sft_alpaca_en/alpaca_en_sample5000.jsonl", "alpaca", 4997, 3),  # three rows with an empty output
        ("sft_alpaca_zh/alpaca_zh_sample5000.jsonl", "alpaca", 5000, 0),
        ("sft_oasst_zh/oaast_sft_zh.json", "oasst_zh", 689, 0),
        ("toolcall_glaive/glaive_toolcall_en_demo.json", "sharegpt", 300, 0),
        ("toolcall_glaive/glaive_toolcall_zh_demo.json", "sharegpt", 298, 2),  # calls written as plain text
    ],
)
def test_real_sft_files(rel, fmt, n, skipped) -> None:
    res = read_sft(SHARED / rel, skip_invalid=True)
    assert (res.format, len(res.conversations), len(res.skipped)) == (fmt, n, skipped)
    assert all(c.messages[-1]["role"] == "assistant" for c in res.conversations)
    if fmt == "oasst_zh":
        assert sum(len(c.messages) > 2 for c in res.conversations) == 390  # rows with history
    if fmt == "sharegpt":
        with_calls = [c for c in res.conversations if any(m.get("tool_calls") for m in c.messages)]
        assert len(with_calls) > 100 and all(c.tools for c in with_calls)


@needs_shared
@pytest.mark.parametrize("name", ["glaive_toolcall_en_demo.json", "glaive_toolcall_zh_demo.json"])
def test_real_tool_chats_round_trip_through_the_template(name, tiny_tokenizer) -> None:
    """Every generated assistant turn (the masked span minus its terminator) parses back to the message."""
    convs = read_sft(SHARED / "toolcall_glaive" / name, skip_invalid=True).conversations
    convs = [c for c in convs if any(m.get("tool_calls") for m in c.messages)][:25]
    checked = 0
    for conv in convs:
        spans = masked_spans(tiny_tokenizer, encode_conversation(tiny_tokenizer, conv))
        assistants = [m for m in conv.messages if m["role"] == "assistant"]
        assert len(spans) == len(assistants), conv.where
        for span, message in zip(spans, assistants, strict=True):
            terminator = span[span.rindex("<|") :]
            assert terminator in ("<|user|>", "<|observation|>", "<|endoftext|>")
            assert parse_assistant_text(span[: -len(terminator)]) == message, conv.where
            checked += 1
    assert checked > 50
