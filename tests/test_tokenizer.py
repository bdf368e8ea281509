"""The GLM tokenizer: special tokens, the GLM-4 chat template, the SFT assistant mask, save / reload."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from glmwb.pretrain.tokenizer import (
    GLM4_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    TURN_TERMINATORS,
    encode_chat,
    render_chat,
    train_tokenizer,
    turn_terminator_ids,
)
from tests.conftest import tiny_corpus

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
# GLM-4's tools turn for WEATHER_TOOL, as glm-4-9b-chat's official template renders it (golden text; the
# official template itself is rendered against ours in tests/test_chat_template_official.py)
WEATHER_TOOL_TEXT = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n"
    "# 可用工具\n## get_weather\n\n"
    "{\n"
    '    "name": "get_weather",\n'
    '    "description": "Weather of a city",\n'
    '    "parameters": {\n'
    '        "type": "object",\n'
    '        "properties": {\n'
    '            "city": {\n'
    '                "type": "string"\n'
    "            }\n"
    "        }\n"
    "    }\n"
    "}\n"
    "在调用上述函数时，请使用 Json 格式表示调用的参数。"
)
MULTI_TURN = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "今天北京的天气怎么样？"},
    {"role": "assistant", "content": "很好，阳光明媚。"},
]
TOOL_CHAT = [
    {"role": "user", "content": "北京天气？"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}
        ],
    },
    {"role": "tool", "content": '{"temp": 20}'},
    {"role": "assistant", "content": "北京 20 度。"},
]


def masked_spans(tokenizer, encoded: dict[str, list[int]]) -> list[str]:
    """Decode each run of consecutive mask-1 tokens (one run per assistant turn)."""
    spans, run = [], []
    for token_id, m in zip(encoded["input_ids"], encoded["assistant_mask"], strict=True):
        if m:
            run.append(token_id)
        elif run:
            spans.append(run)
            run = []
    if run:
        spans.append(run)
    return [tokenizer.decode(s) for s in spans]


# --- special tokens ---------------------------------------------------------------------------------------


def test_special_tokens_are_ids_0_to_9_and_single_tokens(tiny_tokenizer):
    assert [tiny_tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(10))
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tiny_tokenizer(token, add_special_tokens=False)["input_ids"] == [i]
        # Never split, whatever text is glued on either side.
        ids = tiny_tokenizer(f"abc{token}你好{token}", add_special_tokens=False)["input_ids"]
        assert ids.count(i) == 2
        assert tiny_tokenizer.decode(ids) == f"abc{token}你好{token}"
    assert set(tiny_tokenizer.all_special_tokens) == set(SPECIAL_TOKENS)
    assert sorted(tiny_tokenizer.all_special_ids) == list(range(10))
    ids = tiny_tokenizer("[gMASK]<sop><|user|>\nHi<|assistant|>\nHello<|endoftext|>")["input_ids"]
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == "\nHi\nHello"
    assert tiny_tokenizer.eos_token == tiny_tokenizer.pad_token == "<|endoftext|>"
    assert tiny_tokenizer.eos_token_id == tiny_tokenizer.pad_token_id == 0


def test_no_merge_learned_from_special_token_text(tiny_tokenizer):
    # The corpus contains rendered chats; their special tokens must not leak into BPE merges ("<|", "<|user").
    learned = [tiny_tokenizer.decode([i]) for i in range(len(SPECIAL_TOKENS), len(tiny_tokenizer))]
    assert not [t for t in learned if "<|" in t or "|>" in t or "MASK]" in t or "sop>" in t]


def test_turn_terminators(tiny_tokenizer):
    assert TURN_TERMINATORS == ("<|user|>", "<|observation|>", "<|endoftext|>")
    assert turn_terminator_ids(tiny_tokenizer) == [7, 9, 0]


def test_tokenizer_settings(tiny_tokenizer):
    assert tiny_tokenizer.padding_side == "left"
    assert tiny_tokenizer.model_max_length == 1024
    batch = tiny_tokenizer(["Hello", "The quick brown fox jumps"], padding=True)
    assert set(batch) == {"input_ids", "attention_mask"}  # GLM takes no token_type_ids
    assert batch["input_ids"][0][0] == tiny_tokenizer.pad_token_id and batch["attention_mask"][0][0] == 0
    assert batch["attention_mask"][1] == [1] * len(batch["input_ids"][1])


def test_vocab_size_too_small_is_an_error():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["hello"], vocab_size=100, show_progress=False)


# --- bilingual text ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "用户说 hello，助手回答 你好！😀",
        "GLM-4 是一个中英双语模型 (bilingual model)。",
        "混合 text with emoji 🤖🎉 and rare 𠀀𪚥 characters, tabs\tand\n\n  spaces  ",
        "日本語のテキストも OK。한국어도 돼요. Ünïcödé café",
        "12345678 + 3.14159 = ？",
    ],
)
def test_decode_encode_round_trip(tiny_tokenizer, text):
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text


def test_chinese_characters_are_tokens_and_split_from_latin(tiny_tokenizer):
    sentence = "今天北京的天气很好，阳光明媚。"  # from the training corpus
    ids = tiny_tokenizer(sentence, add_special_tokens=False)["input_ids"]
    # cjk="char" (the default): merges join each character's UTF-8 bytes, never two characters
    assert [tiny_tokenizer.decode([i]) for i in ids] == list(sentence)
    pieces = tiny_tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str("GLM模型很好，真的！ Hello 世界")
    words = ["GLM模型很好，真的！ Hello 世界"[a:b] for _, (a, b) in pieces]
    assert words == ["GLM", "模", "型", "很", "好", "，", "真", "的", "！", " Hello", " 世", "界"]


def test_cjk_run_mode_learns_multi_character_tokens():
    tok = train_tokenizer(tiny_corpus(), vocab_size=800, show_progress=False, cjk="run")
    sentence = "今天北京的天气很好，阳光明媚。"
    ids = tok(sentence, add_special_tokens=False)["input_ids"]
    assert len(ids) * 4 < len(sentence.encode("utf-8"))  # words, not just characters
    assert tok.decode(ids) == sentence
    # The pre-tokenizer still cuts Han runs from Latin letters and from punctuation.
    pieces = tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("GLM模型很好，真的！ Hello 世界")
    words = ["GLM模型很好，真的！ Hello 世界"[a:b] for _, (a, b) in pieces]
    assert words == ["GLM", "模型很好", "，", "真的", "！", " Hello", " 世界"]


def test_unknown_cjk_mode_is_an_error():
    with pytest.raises(ValueError, match="cjk must be one of 'char', 'run'"):
        train_tokenizer(["hello"], vocab_size=300, show_progress=False, cjk="word")


# --- chat template: golden renders ------------------------------------------------------------------------


def test_render_single_turn(tiny_tokenizer):
    messages = [{"role": "user", "content": "Hello"}]
    assert render_chat(tiny_tokenizer, messages) == "[gMASK]<sop><|user|>\nHello"
    assert (
        render_chat(tiny_tokenizer, messages, add_generation_prompt=True)
        == "[gMASK]<sop><|user|>\nHello<|assistant|>"
    )


def test_render_multi_turn_with_system(tiny_tokenizer):
    assert render_chat(tiny_tokenizer, MULTI_TURN) == (
        "[gMASK]<sop><|system|>\nYou are a helpful assistant.<|user|>\nHello<|assistant|>\nHi there"
        "<|user|>\n今天北京的天气怎么样？<|assistant|>\n很好，阳光明媚。"
    )
    assert render_chat(tiny_tokenizer, MULTI_TURN[:4], add_generation_prompt=True) == (
        "[gMASK]<sop><|system|>\nYou are a helpful assistant.<|user|>\nHello<|assistant|>\nHi there"
        "<|user|>\n今天北京的天气怎么样？<|assistant|>"
    )


def test_render_tools_in_a_new_system_turn(tiny_tokenizer):
    rendered = render_chat(tiny_tokenizer, [{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL])
    assert rendered == f"[gMASK]<sop><|system|>\n{WEATHER_TOOL_TEXT}<|user|>\nWeather?"
    # A bare function spec (no {"type": "function", "function": ...} wrapper) renders the same.
    bare = render_chat(
        tiny_tokenizer, [{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL["function"]]
    )
    assert bare == rendered


def test_render_tools_before_the_system_turn(tiny_tokenizer):
    # GLM-4: the tools are a system turn of their own, then the system prompt is a second <|system|> turn.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}]
    rendered = render_chat(tiny_tokenizer, messages, tools=[WEATHER_TOOL], add_generation_prompt=True)
    assert rendered == (
        f"[gMASK]<sop><|system|>\n{WEATHER_TOOL_TEXT}<|system|>\nBe brief.<|user|>\nWeather?<|assistant|>"
    )
    # GLM-4's own form (the tools inside the system message) renders the same
    glm = [{"role": "system", "content": "Be brief.", "tools": [WEATHER_TOOL]}, messages[1]]
    assert render_chat(tiny_tokenizer, glm, add_generation_prompt=True) == rendered


def test_render_tool_call_and_observation(tiny_tokenizer):
    assert render_chat(tiny_tokenizer, TOOL_CHAT) == (
        '[gMASK]<sop><|user|>\n北京天气？<|assistant|>get_weather\n{"city": "北京"}'
        '<|observation|>\n{"temp": 20}<|assistant|>\n北京 20 度。'
    )
    # Arguments given as a JSON string are written as they are; "observation" is an alias of "tool".
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}],
        },
        {"role": "observation", "content": "sunny"},
    ]
    assert render_chat(tiny_tokenizer, messages, add_generation_prompt=True) == (
        '[gMASK]<sop><|user|>\nWeather?<|assistant|>get_weather\n{"city":"Paris"}<|observation|>\nsunny<|assistant|>'
    )


def test_render_text_before_a_call_and_parallel_calls(tiny_tokenizer):
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}
    call2 = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "上海"}}}
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [call, call2]},
    ]
    assert render_chat(tiny_tokenizer, messages) == (
        "[gMASK]<sop><|user|>\nWeather?<|assistant|>\nLet me check."
        '<|assistant|>get_weather\n{"city": "北京"}<|assistant|>get_weather\n{"city": "上海"}'
    )


def test_render_rejects_unknown_roles_and_system_after_assistant(tiny_tokenizer):
    with pytest.raises(Exception, match=r"message 0 \(narrator\): unknown role"):
        render_chat(tiny_tokenizer, [{"role": "narrator", "content": "x"}])
    with pytest.raises(Exception, match="system message cannot follow"):
        render_chat(tiny_tokenizer, MULTI_TURN[:3] + [{"role": "system", "content": "x"}])


# --- chat template: tokenization --------------------------------------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_rendered_text_never_doubles_gmask_sop(tiny_tokenizer, add_generation_prompt):
    rendered = render_chat(tiny_tokenizer, MULTI_TURN[:4], add_generation_prompt=add_generation_prompt)
    gmask, sop = tiny_tokenizer.convert_tokens_to_ids(["[gMASK]", "<sop>"])
    for ids in (
        tiny_tokenizer(rendered)["input_ids"],
        tiny_tokenizer(rendered, add_special_tokens=True)["input_ids"],
        tiny_tokenizer.encode(rendered),
        tiny_tokenizer.apply_chat_template(
            MULTI_TURN[:4], add_generation_prompt=add_generation_prompt, return_dict=False
        ),
    ):
        assert ids[:2] == [gmask, sop]
        assert ids.count(gmask) == 1 and ids.count(sop) == 1
    assert (
        tiny_tokenizer("plain text")["input_ids"]
        == tiny_tokenizer("plain text", add_special_tokens=False)["input_ids"]
    )


@pytest.mark.parametrize(("messages", "tools"), [(MULTI_TURN, None), (TOOL_CHAT, [WEATHER_TOOL])])
def test_apply_chat_template_ids_equal_tokenized_render(tiny_tokenizer, messages, tools):
    for add_generation_prompt in (False, True):
        ids = tiny_tokenizer.apply_chat_template(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            return_dict=False,
        )
        rendered = render_chat(
            tiny_tokenizer, messages, tools=tools, add_generation_prompt=add_generation_prompt
        )
        assert ids == tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"]
        assert tiny_tokenizer.decode(ids) == rendered


# --- assistant mask ---------------------------------------------------------------------------------------


def test_assistant_mask_multi_turn(tiny_tokenizer):
    enc = encode_chat(tiny_tokenizer, MULTI_TURN)
    rendered_ids = tiny_tokenizer(render_chat(tiny_tokenizer, MULTI_TURN), add_special_tokens=False)[
        "input_ids"
    ]
    assert enc["input_ids"] == rendered_ids + [tiny_tokenizer.eos_token_id]
    assert len(enc["assistant_mask"]) == len(enc["input_ids"])
    # Each assistant turn: the "\n" after <|assistant|>, its content, and the token that ends the turn.
    assert masked_spans(tiny_tokenizer, enc) == ["\nHi there<|user|>", "\n很好，阳光明媚。<|endoftext|>"]
    unmasked = [t for t, m in zip(enc["input_ids"], enc["assistant_mask"], strict=True) if not m]
    assert tiny_tokenizer.decode(unmasked) == (
        "[gMASK]<sop><|system|>\nYou are a helpful assistant.<|user|>\nHello<|assistant|>"
        "\n今天北京的天气怎么样？<|assistant|>"
    )


def test_assistant_mask_tool_call_and_observation(tiny_tokenizer):
    enc = encode_chat(tiny_tokenizer, TOOL_CHAT, tools=[WEATHER_TOOL])
    assert masked_spans(tiny_tokenizer, enc) == [
        'get_weather\n{"city": "北京"}<|observation|>',
        "\n北京 20 度。<|endoftext|>",
    ]
    # The tools turn that opens the first piece is prompt, not answer.
    header = tiny_tokenizer(f"[gMASK]<sop><|system|>\n{WEATHER_TOOL_TEXT}<|user|>")["input_ids"]
    assert enc["input_ids"][: len(header)] == header
    assert not any(enc["assistant_mask"][: len(header)])


def test_assistant_mask_one_turn_of_several_segments(tiny_tokenizer):
    # Text, then a call, in one message; then a second assistant message straight after: all one turn, so
    # the inner <|assistant|> tokens are generated (1) and only the opening one is prompt (0).
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [call]},
        {"role": "observation", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
        {"role": "assistant", "content": "Anything else?"},
    ]
    enc = encode_chat(tiny_tokenizer, messages)
    assert masked_spans(tiny_tokenizer, enc) == [
        '\nLet me check.<|assistant|>get_weather\n{"city": "北京"}<|observation|>',
        "\nSunny.<|assistant|>\nAnything else?<|endoftext|>",
    ]


def test_assistant_mask_conversation_ending_with_user(tiny_tokenizer):
    enc = encode_chat(tiny_tokenizer, MULTI_TURN[:4])
    assert enc["input_ids"][-1] != tiny_tokenizer.eos_token_id  # nothing appended after a user turn
    assert masked_spans(tiny_tokenizer, enc) == ["\nHi there<|user|>"]
    assert enc["assistant_mask"][-1] == 0


def test_assistant_mask_matches_generation_blocks(tiny_tokenizer):
    # `apply_chat_template(return_assistant_tokens_mask=True)` (what TRL's assistant_only_loss reads) marks the
    # same tokens; only the final <|endoftext|>, which the template does not render, is encode_chat's own.
    for messages, tools in ((MULTI_TURN, None), (TOOL_CHAT, [WEATHER_TOOL])):
        out = tiny_tokenizer.apply_chat_template(messages, tools=tools, return_assistant_tokens_mask=True)
        enc = encode_chat(tiny_tokenizer, messages, tools=tools)
        assert out["input_ids"] == enc["input_ids"][:-1]
        assert out["assistant_masks"] == enc["assistant_mask"][:-1]


def test_control_tokens_inside_messages_are_text(tiny_tokenizer):
    # An answer that quotes "<|user|>" must not end its own turn early or shift the mask.
    messages = [
        {"role": "user", "content": "What ends a turn?"},
        {"role": "assistant", "content": "The <|user|> token."},
    ]
    enc = encode_chat(tiny_tokenizer, messages)
    user_id = tiny_tokenizer.convert_tokens_to_ids("<|user|>")
    assert enc["input_ids"].count(user_id) == 1
    assert masked_spans(tiny_tokenizer, enc) == ["\nThe <|user|> token.<|endoftext|>"]
    raw = encode_chat(tiny_tokenizer, messages, sanitize_control_tokens=False)
    assert raw["input_ids"].count(user_id) == 2


# --- save / reload ----------------------------------------------------------------------------------------


def test_autotokenizer_reload_is_identical(tmp_path):
    trained = train_tokenizer(tiny_corpus(), vocab_size=700, show_progress=False, model_max_length=512)
    trained.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)

    assert loaded.get_vocab() == trained.get_vocab()
    assert loaded.chat_template == trained.chat_template == GLM4_CHAT_TEMPLATE
    assert (loaded.eos_token, loaded.pad_token, loaded.padding_side, loaded.model_max_length) == (
        "<|endoftext|>",
        "<|endoftext|>",
        "left",
        512,
    )
    assert [loaded.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(10))
    texts = ["用户说 hello，助手回答 你好！😀", "[gMASK]<sop><|user|>\nHi<|assistant|>", "  spaced\n\ttext "]
    for text in texts:
        assert loaded(text)["input_ids"] == trained(text)["input_ids"]
    for messages, tools in ((MULTI_TURN, None), (TOOL_CHAT, [WEATHER_TOOL])):
        assert render_chat(loaded, messages, tools) == render_chat(trained, messages, tools)
        assert encode_chat(loaded, messages, tools) == encode_chat(trained, messages, tools)
