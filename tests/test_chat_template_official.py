"""Golden tests: our GLM-4 chat template against GLM-4's official one (glm-4-9b-chat's, rendered here through
``transformers`` as every user of that tokenizer renders it), string for string and token for token, on a
tokenizer with GLM-4's own special-token ids (151329..) and on one trained here (ids 0..9). GLM-4's own
message form (tools in the system message, ``metadata``, role ``observation``) and the OpenAI form
(``tools=``, ``tool_calls``, role ``tool``) give the same tokens; anything else is refused, naming the message.
"""

from __future__ import annotations

import copy
import json

import pytest

from glmwb.pretrain.tokenizer import (
    GLM4_CHAT_TEMPLATE,
    encode_chat,
    glm_special_ids,
    glm_tokenizer,
    render_chat,
    turn_terminator_ids,
)
from tests.glm4_fixture import GLM4_IDS, OFFICIAL_GLM4_TEMPLATE

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "查询一个城市的天气 (weather of a city)",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "城市名"}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "description": "Current time", "parameters": {"type": "object"}},
}


def call(name: str, arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def args_text(arguments: dict) -> str:
    """How the template writes an arguments object (transformers' tojson: json.dumps, no ASCII escapes)."""
    return json.dumps(arguments, ensure_ascii=False)


# (name, GLM-4's own form, the OpenAI form or None, the OpenAI form's tools=)
CASES = [
    ("single_turn", [{"role": "user", "content": "Hello"}], None, None),
    (
        "multi_turn_with_system",
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi there! How can I help?"},
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "Thanks."},
        ],
        None,
        None,
    ),
    (
        "chinese",
        [
            {"role": "system", "content": "你是一个乐于助人的助手。"},
            {"role": "user", "content": "今天北京的天气怎么样？"},
            {"role": "assistant", "content": "很好，阳光明媚。\n\n出门记得带伞 ☂️"},
            {"role": "user", "content": "床前明月光，疑是地上霜。下一句是？"},
        ],
        None,
        None,
    ),
    (
        "tools_call_observation",
        [
            {"role": "system", "content": "You are a helpful assistant.", "tools": [WEATHER, TIME]},
            {"role": "user", "content": "北京天气？"},
            {"role": "assistant", "metadata": "get_weather", "content": args_text({"city": "北京"})},
            {"role": "observation", "content": '{"temp": 20, "sky": "晴"}'},
            {"role": "assistant", "content": "北京 20 度，晴。"},
            {"role": "user", "content": "几点了？"},
        ],
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "北京天气？"},
            {"role": "assistant", "tool_calls": [call("get_weather", {"city": "北京"})]},
            {"role": "tool", "content": '{"temp": 20, "sky": "晴"}'},
            {"role": "assistant", "content": "北京 20 度，晴。"},
            {"role": "user", "content": "几点了？"},
        ],
        [WEATHER, TIME],
    ),
    (
        "tools_without_a_system_prompt",
        [
            {"role": "system", "content": "", "tools": [WEATHER]},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "metadata": "get_weather", "content": '{"city":"Paris"}'},
            {"role": "observation", "content": "sunny"},
        ],
        [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call("get_weather", '{"city":"Paris"}')]},
            {"role": "tool", "content": "sunny"},
        ],
        [WEATHER],
    ),
    (
        "text_before_a_call_and_parallel_calls",
        [
            {"role": "system", "content": "", "tools": [WEATHER, TIME]},
            {"role": "user", "content": "Weather in 北京 and 上海, and the time?"},
            {"role": "assistant", "content": "Let me check."},
            {"role": "assistant", "metadata": "get_weather", "content": args_text({"city": "北京"})},
            {"role": "assistant", "metadata": "get_weather", "content": args_text({"city": "上海"})},
            {"role": "assistant", "metadata": "get_time", "content": "{}"},
            {"role": "observation", "content": "晴"},
            {"role": "observation", "content": "雨"},
            {"role": "observation", "content": "12:00"},
            {"role": "assistant", "content": "北京晴，上海雨，现在 12:00。"},
        ],
        [
            {"role": "user", "content": "Weather in 北京 and 上海, and the time?"},
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [
                    call("get_weather", {"city": "北京"}),
                    call("get_weather", {"city": "上海"}),
                    call("get_time", {}),
                ],
            },
            {"role": "tool", "content": "晴"},
            {"role": "tool", "content": "雨"},
            {"role": "tool", "content": "12:00"},
            {"role": "assistant", "content": "北京晴，上海雨，现在 12:00。"},
        ],
        [WEATHER, TIME],
    ),
    (
        "empty_messages",
        [
            {"role": "system", "content": ""},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": ""},
            {"role": "user", "content": "Anyone there?"},
            {"role": "assistant", "content": "Yes."},
            {"role": "user", "content": None},
            {"role": "assistant", "metadata": "get_weather", "content": ""},
        ],
        None,
        None,
    ),
]
IDS = [c[0] for c in CASES]


def render(tok, template: str, messages, tools=None, add_generation_prompt=False, tokenize=False):
    return tok.apply_chat_template(
        copy.deepcopy(messages),
        tools=tools,
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        tokenize=tokenize,
        return_dict=False,
    )


@pytest.fixture(scope="module", params=["glm4_ids", "ids_0_to_9"])
def tok(request, glm4_tokenizer, tiny_tokenizer):
    """GLM-4's ids (the glm-4-9b-chat-hf stand-in) and a tokenizer trained here, each with our template."""
    return glm_tokenizer(copy.deepcopy(glm4_tokenizer if request.param == "glm4_ids" else tiny_tokenizer))


@pytest.mark.parametrize("add_generation_prompt", [False, True], ids=["no_gen_prompt", "gen_prompt"])
@pytest.mark.parametrize(("name", "glm", "openai", "tools"), CASES, ids=IDS)
def test_ours_renders_the_official_string_and_tokens(tok, name, glm, openai, tools, add_generation_prompt):
    official = render(tok, OFFICIAL_GLM4_TEMPLATE, glm, add_generation_prompt=add_generation_prompt)
    ours = render(tok, GLM4_CHAT_TEMPLATE, glm, add_generation_prompt=add_generation_prompt)
    assert ours == official
    official_ids = tok(official, add_special_tokens=False)["input_ids"]
    ours_ids = render(
        tok, GLM4_CHAT_TEMPLATE, glm, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    assert ours_ids == official_ids
    assert render_chat(tok, glm, add_generation_prompt=add_generation_prompt) == official
    if openai is not None:  # the OpenAI form of the same conversation: the same string and tokens
        assert render(tok, GLM4_CHAT_TEMPLATE, openai, tools, add_generation_prompt) == official
        assert (
            render(tok, GLM4_CHAT_TEMPLATE, openai, tools, add_generation_prompt, tokenize=True)
            == official_ids
        )


@pytest.mark.parametrize(("name", "glm", "openai", "tools"), CASES, ids=IDS)
def test_the_training_encoding_is_the_official_tokens_plus_the_terminator(tok, name, glm, openai, tools):
    official_ids = tok(render(tok, OFFICIAL_GLM4_TEMPLATE, glm), add_special_tokens=False)["input_ids"]
    enc = encode_chat(tok, glm)
    ends_with_answer = [m for m in glm if m.get("content")][-1]["role"] == "assistant"
    assert enc["input_ids"] == official_ids + ([tok.eos_token_id] if ends_with_answer else [])
    if openai is not None:
        assert encode_chat(tok, openai, tools=tools) == enc  # the same ids and the same loss mask


def test_golden_tools_turn_text(tok):
    """The tools turn, written out: GLM-4's preamble, `# 可用工具`, one newline, `## name`, the JSON (indent 4,
    no ASCII escapes, keys in the schema's order) and the instruction line; then the system prompt's own turn."""
    messages = [
        {"role": "system", "content": "Be brief.", "tools": [TIME]},
        {"role": "user", "content": "几点？"},
    ]
    assert render_chat(tok, messages, add_generation_prompt=True) == (
        "[gMASK]<sop><|system|>\n"
        "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
        "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n"
        "# 可用工具\n## get_time\n\n"
        '{\n    "name": "get_time",\n    "description": "Current time",\n    "parameters": {\n'
        '        "type": "object"\n    }\n}\n'
        "在调用上述函数时，请使用 Json 格式表示调用的参数。"
        "<|system|>\nBe brief.<|user|>\n几点？<|assistant|>"
    )


def test_special_ids_come_from_the_tokenizer(glm4_tokenizer, tiny_tokenizer):
    tok = glm_tokenizer(copy.deepcopy(glm4_tokenizer))
    assert tok.chat_template == GLM4_CHAT_TEMPLATE and glm4_tokenizer.chat_template == OFFICIAL_GLM4_TEMPLATE
    ids = glm_special_ids(tok)
    assert {t: ids[t] for t in GLM4_IDS if t in ids} == {t: i for t, i in GLM4_IDS.items() if t in ids}
    assert turn_terminator_ids(tok) == [151336, 151338, 151329]
    assert turn_terminator_ids(tiny_tokenizer) == [7, 9, 0]
    enc = encode_chat(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    assert enc["input_ids"][:3] == [151331, 151333, 151336] and enc["input_ids"][-1] == 151329
    assert enc["assistant_mask"][-1] == 1 and enc["input_ids"][enc["assistant_mask"].index(1) - 1] == 151337


def test_a_tokenizer_without_glm_tokens_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import tiny_corpus

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel()
    backend.train_from_iterator(tiny_corpus(1), trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    with pytest.raises(ValueError, match=r"not a GLM-4 tokenizer: it has no \[gMASK\], <sop>"):
        glm_tokenizer(tok)


def test_end_final_turn_appends_the_tokenizers_eos_inside_the_answer(tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    plain = render(tok, GLM4_CHAT_TEMPLATE, messages)
    ended = tok.apply_chat_template(messages, tokenize=False, end_final_turn=True)
    assert ended == plain + tok.eos_token
    out = tok.apply_chat_template(messages, end_final_turn=True, return_assistant_tokens_mask=True)
    enc = encode_chat(tok, messages)
    assert out["input_ids"] == enc["input_ids"] and out["assistant_masks"] == enc["assistant_mask"]
    # nothing after a prompt, or with the generation prompt
    prompt = messages[:1]
    assert tok.apply_chat_template(prompt, tokenize=False, end_final_turn=True) == render(
        tok, GLM4_CHAT_TEMPLATE, prompt
    )
    assert tok.apply_chat_template(
        messages, tokenize=False, end_final_turn=True, add_generation_prompt=True
    ) == render(tok, GLM4_CHAT_TEMPLATE, messages, add_generation_prompt=True)


@pytest.mark.parametrize(
    ("messages", "tools", "message"),
    [
        ([{"role": "narrator", "content": "x"}], None, r"message 0 \(narrator\): unknown role"),
        ([{"content": "x"}], None, r"message 0 has no role"),
        (
            [{"role": "user", "content": "x", "tool_calls": [call("f", {})]}],
            None,
            r"message 0 \(user\): only an assistant message has tool_calls",
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "user", "content": "x", "tools": [WEATHER]}],
            None,
            r"message 1 \(user\): tools belong in a system message",
        ),
        (
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "{}", "metadata": {"n": 1}}],
            None,
            r"message 1 \(assistant\): metadata must be text",
        ),
        (
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "{}", "metadata": "f", "tool_calls": [call("f", {})]},
            ],
            None,
            r"message 1 \(assistant\): has both metadata and tool_calls",
        ),
        (
            [{"role": "system", "content": "", "tools": [WEATHER]}, {"role": "user", "content": "q"}],
            [WEATHER],
            r"tools are given both as tools=\[...\] and inside a system message",
        ),
        (
            [
                {"role": "system", "content": "", "tools": [{"type": "python"}]},
                {"role": "user", "content": "q"},
            ],
            None,
            r"message 0 \(system\): tool 0 has type python; only function tools",
        ),
        (
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
                {"role": "system", "content": "s"},
            ],
            None,
            r"message 2 \(system\): a system message cannot follow an assistant message",
        ),
        (
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]},
            ],
            None,
            r"message 1 \(assistant\): a tool call needs a function name",
        ),
    ],
    ids=[
        "role",
        "no_role",
        "user_calls",
        "tools_on_user",
        "metadata_type",
        "both_call_forms",
        "tools_twice",
        "builtin_tool",
        "system_after_assistant",
        "nameless_call",
    ],  # fmt: skip
)
def test_anything_else_is_refused_naming_the_message(tok, messages, tools, message):
    with pytest.raises(Exception, match=message):
        render_chat(tok, messages, tools=tools)
