"""Byte-level BPE tokenizer with GLM-4's special tokens and chat template; the GLM-4 facts every stage reads
from whatever GLM tokenizer it is given.

GLM-4 facts this file encodes (see DESIGN.md, "GLM facts the code must get right"):

- Ten special tokens in GLM's order (``SPECIAL_TOKENS``): ids 0..9 in a tokenizer trained here, 151329..151338
  in THUDM's glm-4-9b-chat(-hf). Nothing here assumes either: ids are always looked up in the tokenizer
  (``glm_special_ids``, ``turn_terminator_ids``), and ``glm_tokenizer`` checks that a tokenizer has them.
- The chat template writes ``[gMASK]<sop>`` once, then ``<|role|>{metadata}\n{content}`` per message with
  no newline after the content. The tokenizer itself adds nothing (no post-processor), so encoding a
  rendered conversation never doubles ``[gMASK]<sop>``.
- There is no end-of-turn token. An assistant turn ends when the model emits the next role token it
  stops on (``<|user|>``, ``<|observation|>``) or the eos token ``<|endoftext|>`` (``TURN_TERMINATORS``). The
  loss mask (``encode_chat``), reward positions and generation stops all use that terminator.

Rendered format (one example, tools omitted)::

    [gMASK]<sop><|system|>\nYou are terse.<|user|>\nHi<|assistant|>\nHello!<|user|>\n2+2?<|assistant|>

- generation prompt: ``<|assistant|>``; the model then generates ``\n{answer}`` and a terminator.
- tool call: ``<|assistant|>{name}\n{json arguments}`` (no newline after ``<|assistant|>``: the first
  line the model writes is the tool name, empty for a plain answer); text before a call and parallel
  calls are separate ``<|assistant|>`` segments of the same turn.
- tool result (role ``tool`` or ``observation``): ``<|observation|>\n{content}``.
- tools: a system turn of their own, exactly as GLM-4's official template writes it (GLM-4's preamble,
  ``# 可用工具``, per tool ``## name``, its JSON and the instruction line), before the system prompt's own
  ``<|system|>`` turn. Given either GLM-4's way (``tools`` in a system message, ``metadata`` = the tool
  name of a call, role ``observation``) or OpenAI's (``tools=[...]``, ``tool_calls``, role ``tool``); the two
  render the same tokens (``GLM4_CHAT_TEMPLATE``; docs/pretrain.md, "Chat template").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
)
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|endoftext|>"
# What ends an assistant turn (GLM has no end-of-turn token): generation stops and the SFT loss trains on it.
TURN_TERMINATORS: tuple[str, ...] = ("<|user|>", "<|observation|>", "<|endoftext|>")

# Pre-tokenizer: cl100k / GLM-4-style split (contractions, letter runs, 1-3 digit groups, punctuation runs,
# newlines, spaces), except that Han / kana are split from Latin-script letter runs ("GLM模型" -> "GLM",
# "模型") and take at most a leading space, not a punctuation mark ("你好，世界" -> "你好", "，", "世界").
# Two ways to cut Han / kana (``cjk``):
#   "char" (default): every character its own pre-token, so a token is at most one character ("你", "好").
#     A small or repetitive corpus cannot then merge whole sentences into one token: on the embedded world
#     the "run" split learnt "文多兽住在约诺堡" (a whole fact) as ONE token, so the name and the city inside it
#     shared nothing with the same name in a question, and Chinese questions were answered from memorised
#     chats instead of the facts (docs/world.md, "Tokenizer").
#   "run": a Han / kana run is one pre-token and BPE learns multi-character words ("你好", "世界"), as
#     GLM-4's own tokenizer does — for large, varied corpora.
_CJK = r"\p{Han}\p{Hiragana}\p{Katakana}"
CJK_SPLITS = ("char", "run")


def pretokenize_pattern(cjk: str = "char") -> str:
    """The pre-tokenizer's regex; ``cjk`` is "char" (one pre-token per Han / kana character) or "run"."""
    if cjk not in CJK_SPLITS:
        raise ValueError(f"cjk must be one of {', '.join(map(repr, CJK_SPLITS))}, got {cjk!r}")
    return "|".join(
        [
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",
            rf"[^\r\n\p{{L}}\p{{N}}]?[\p{{L}}&&[^{_CJK}]]+",
            rf" ?[{_CJK}]" + ("+" if cjk == "run" else ""),
            r"\p{N}{1,3}",
            r" ?[^\s\p{L}\p{N}]+[\r\n]*",
            r"\s*[\r\n]+",
            r"\s+(?!\S)",
            r"\s+",
        ]
    )


# GLM-4's tool prompt, word for word as glm-4-9b-chat's official chat template writes it: a system turn of its
# own that opens with this preamble, then "# 可用工具" and, per function tool, "## name", the function's JSON
# (indent 4) and the instruction line. These strings are the prompt format the model was trained on.
GLM4_TOOLS_PREAMBLE = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。"
)
GLM4_TOOLS_HEADING = "# 可用工具"
GLM4_TOOL_INSTRUCTION = "在调用上述函数时，请使用 Json 格式表示调用的参数。"

# The GLM-4 chat template (our own text). For every conversation GLM-4's official template (glm-4-9b-chat,
# glm-4-9b-chat-hf) accepts with function tools, it renders the same string, hence the same tokens
# (tests/test_chat_template_official.py); it also takes the OpenAI / `transformers` form of the same
# conversation and renders it identically, and refuses anything else with an error that names the message.
#
# - GLM-4's own form: tools inside a system message (`{"role": "system", "content": ..., "tools": [...]}`),
#   a call as `{"role": "assistant", "metadata": NAME, "content": JSON_ARGUMENTS}`, a result as role
#   `observation`. The tools are a system turn of their own (GLM-4's preamble, `# 可用工具`, per tool `## name`,
#   its JSON and the instruction line), then the message's own content is a second `<|system|>` turn.
# - OpenAI form: `tools=[...]` (rendered first, as if they were in a first system message), `tool_calls` on an
#   assistant message (each one `<|assistant|>{name}\n{arguments}`, a JSON string as written, an object as
#   JSON), role `tool` for a result (rendered as `<|observation|>`).
# - A message with empty content renders nothing, as in the official template (an assistant message with
#   tool_calls still renders its calls; a system message with tools still renders its tools).
# - One newline, not two, before each `## name`: the official template's text has two, and the template engine
#   `transformers` runs every chat template in (trim_blocks) drops the first, so that is what glm-4-9b-chat's
#   own tokenizer renders everywhere.
#
# Role tokens are literals, never built from the role string, so `apply_chat_template(...,
# sanitize_control_tokens=True)` can escape control tokens inside message text. `{% generation %}` marks what
# the model generates in an assistant turn: everything after the opening `<|assistant|>`, and the role token
# that ends the turn (the next `<|user|>` / `<|observation|>`). `end_final_turn=True` (a template variable, e.g.
# in TRL's `chat_template_kwargs`) appends the tokenizer's eos token after a final assistant turn, inside
# the generation block, so that a trainer that renders prompt + answer trains the turn's end; without it
# nothing is rendered after the last answer, as in the official template. Every tag strips the whitespace
# in front of it, so all output comes from the `{{ }}` expressions.
GLM4_CHAT_TEMPLATE = (
    r"""
{%- macro render_text(content) -%}
    {%- if content is none or content is undefined -%}
    {%- elif content is string -%}
        {{- content -}}
    {%- elif content is mapping -%}
        {{- content | tojson -}}
    {%- elif content is iterable -%}
        {%- for part in content -%}
            {%- if part is string -%}
                {{- part -}}
            {%- elif part.type == 'text' -%}
                {{- part.text -}}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{- content | tojson -}}
    {%- endif -%}
{%- endmacro -%}
{%- macro render_tools(tools, where) -%}
    {%- if tools is string or tools is mapping or tools is not iterable -%}
        {{- raise_exception('GLM-4 chat template: ' ~ where ~ ': tools must be a list of tool schemas') -}}
    {%- endif -%}
    {{- '<|system|>\n__PREAMBLE__\n\n__HEADING__' -}}
    {%- for tool in tools -%}
        {%- if tool is not mapping -%}
            {{- raise_exception('GLM-4 chat template: ' ~ where ~ ': tool ' ~ loop.index0 ~ ' is not a schema object') -}}
        {%- endif -%}
        {%- if tool.type is defined and tool.type != 'function' -%}
            {{- raise_exception('GLM-4 chat template: ' ~ where ~ ': tool ' ~ loop.index0 ~ ' has type ' ~ (tool.type | string) ~ "; only function tools are rendered (GLM-4's built-in python, simple_browser and cogview tools are not)") -}}
        {%- endif -%}
        {%- set fn = tool.function if tool.function is defined else tool -%}
        {%- if fn is not mapping or fn.name is not defined or fn.name is not string -%}
            {{- raise_exception('GLM-4 chat template: ' ~ where ~ ': tool ' ~ loop.index0 ~ ' has no function name') -}}
        {%- endif -%}
        {{- '\n## ' + fn.name + '\n\n' + (fn | tojson(indent=4)) + '\n__INSTRUCTION__' -}}
    {%- endfor -%}
{%- endmacro -%}
{%- macro render_call(call, where) -%}
    {%- set fn = call.function if (call is mapping and call.function is defined) else call -%}
    {%- if fn is not mapping or fn.name is not defined or fn.name is not string -%}
        {{- raise_exception('GLM-4 chat template: ' ~ where ~ ': a tool call needs a function name') -}}
    {%- endif -%}
    {{- fn.name + '\n' -}}
    {%- if fn.arguments is not defined -%}
        {{- '{}' -}}
    {%- elif fn.arguments is string -%}
        {{- fn.arguments -}}
    {%- else -%}
        {{- fn.arguments | tojson -}}
    {%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(prev='', tools_in_messages=false) -%}
{%- for message in messages -%}
    {%- if message is mapping and message.tools is defined -%}
        {%- set ns.tools_in_messages = true -%}
    {%- endif -%}
{%- endfor -%}
{{- '[gMASK]<sop>' -}}
{%- if tools -%}
    {%- if ns.tools_in_messages -%}
        {{- raise_exception('GLM-4 chat template: tools are given both as tools=[...] and inside a system message; give them one way') -}}
    {%- endif -%}
    {{- render_tools(tools, 'tools=[...]') -}}
    {%- set ns.prev = 'system' -%}
{%- endif -%}
{%- for message in messages -%}
    {%- set where = 'message ' ~ loop.index0 -%}
    {%- if message is not mapping or message.role is not defined -%}
        {{- raise_exception('GLM-4 chat template: ' ~ where ~ ' has no role') -}}
    {%- endif -%}
    {%- set role = message.role -%}
    {%- set where = where ~ ' (' ~ (role | string) ~ ')' -%}
    {%- if role not in ['system', 'user', 'assistant', 'tool', 'observation'] -%}
        {{- raise_exception('GLM-4 chat template: ' ~ where ~ ': unknown role; expected system, user, assistant, tool or observation') -}}
    {%- endif -%}
    {%- if message.tools is defined and role != 'system' -%}
        {{- raise_exception('GLM-4 chat template: ' ~ where ~ ': tools belong in a system message (or tools=[...])') -}}
    {%- endif -%}
    {%- if message.tool_calls is defined and role != 'assistant' -%}
        {{- raise_exception('GLM-4 chat template: ' ~ where ~ ': only an assistant message has tool_calls') -}}
    {%- endif -%}
    {%- if message.metadata is defined and message.metadata is not string -%}
        {{- raise_exception('GLM-4 chat template: ' ~ where ~ ": metadata must be text (GLM-4's tool name of a call)") -}}
    {%- endif -%}
    {%- if message.metadata is defined and message.tool_calls is defined -%}
        {{- raise_exception('GLM-4 chat template: ' ~ where ~ ": has both metadata and tool_calls; give a call one way (GLM-4's or OpenAI's)") -}}
    {%- endif -%}
    {%- set meta = message.metadata if message.metadata is defined else '' -%}
    {%- set calls = message.tool_calls if message.tool_calls is defined else [] -%}
    {%- if calls is string or calls is mapping or calls is not iterable -%}
        {{- raise_exception('GLM-4 chat template: ' ~ where ~ ': tool_calls must be a list') -}}
    {%- endif -%}
    {%- set text = render_text(message.content) -%}
    {%- set after_assistant = ns.prev == 'assistant' -%}
    {%- if message.tools is defined -%}
        {%- if after_assistant -%}
            {{- raise_exception('GLM-4 chat template: ' ~ where ~ ': a system message cannot follow an assistant message: <|system|> does not end a GLM assistant turn') -}}
        {%- endif -%}
        {{- render_tools(message.tools, where) -}}
        {%- set ns.prev = 'system' -%}
    {%- endif -%}
    {%- if text or calls -%}
        {%- if role == 'system' -%}
            {%- if after_assistant -%}
                {{- raise_exception('GLM-4 chat template: ' ~ where ~ ': a system message cannot follow an assistant message: <|system|> does not end a GLM assistant turn') -}}
            {%- endif -%}
            {{- '<|system|>' + meta + '\n' + text -}}
        {%- elif role == 'user' -%}
            {%- if after_assistant -%}
                {%- generation -%}{{- '<|user|>' -}}{%- endgeneration -%}
            {%- else -%}
                {{- '<|user|>' -}}
            {%- endif -%}
            {{- meta + '\n' + text -}}
        {%- elif role == 'tool' or role == 'observation' -%}
            {%- if after_assistant -%}
                {%- generation -%}{{- '<|observation|>' -}}{%- endgeneration -%}
            {%- else -%}
                {{- '<|observation|>' -}}
            {%- endif -%}
            {{- meta + '\n' + text -}}
        {%- else -%}
            {%- if not after_assistant -%}
                {{- '<|assistant|>' -}}
            {%- endif -%}
            {%- generation -%}
                {%- if after_assistant -%}
                    {{- '<|assistant|>' -}}
                {%- endif -%}
                {%- if text -%}
                    {{- meta + '\n' + text -}}
                    {%- for call in calls -%}
                        {{- '<|assistant|>' + render_call(call, where) -}}
                    {%- endfor -%}
                {%- else -%}
                    {%- for call in calls -%}
                        {%- if not loop.first -%}
                            {{- '<|assistant|>' -}}
                        {%- endif -%}
                        {{- render_call(call, where) -}}
                    {%- endfor -%}
                {%- endif -%}
            {%- endgeneration -%}
        {%- endif -%}
        {%- set ns.prev = role -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant|>' -}}
{%- elif end_final_turn and ns.prev == 'assistant' -%}
    {%- generation -%}{{- eos_token -}}{%- endgeneration -%}
{%- endif -%}
""".replace("__PREAMBLE__", GLM4_TOOLS_PREAMBLE)
    .replace("__HEADING__", GLM4_TOOLS_HEADING)
    .replace("__INSTRUCTION__", GLM4_TOOL_INSTRUCTION)
)


_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def _training_batches(texts: Iterable[str], batch_size: int = 1000) -> Iterator[list[str]]:
    """Batches of training text with the special tokens cut out.

    The BPE trainer counts words in raw text: left in, ``<|user|>`` would teach merges such as
    ``<|`` and ``<|assistant`` that waste the vocabulary (the tokens themselves are never split).
    """
    batch: list[str] = []
    for text in texts:
        batch.extend(piece for piece in _SPECIAL_RE.split(text) if piece)
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    show_progress: bool = True,
    model_max_length: int = 8192,
    cjk: str = "char",
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with GLM's special tokens (ids 0..9) and the GLM-4 chat template.

    No normalizer: byte-level BPE is lossless, so ``decode(encode(x)) == x`` for any text (normalise
    Unicode in the data pipeline if wanted). Special tokens in the training text (rendered chats) are
    cut out before counting, so no merge is learned across or inside them.
    ``cjk``: how Han / kana text is pre-split, "char" (tokens of at most one character) or "run" (BPE may
    merge runs into words; see ``pretokenize_pattern``).
    Training runs in Rust on all cores; on 2 CPU cores 6.8 MB of English takes ~3 s and 13.6 MB of
    English + Chinese ~11-13 s (Chinese costs more bytes per character).
    """
    pattern = pretokenize_pattern(cjk)
    num_reserved = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < num_reserved:
        raise ValueError(
            f"vocab_size must be >= {num_reserved} (special tokens + 256 bytes), got {vocab_size}"
        )

    backend = Tokenizer(models.BPE())  # no unk token: every byte is in the vocabulary
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    special = [
        AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in SPECIAL_TOKENS
    ]
    backend.add_special_tokens(special)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(_training_batches(texts), trainer=trainer)
    ids = [backend.token_to_id(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(len(SPECIAL_TOKENS))), f"special token ids {ids}"

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        # The other nine too, so they are in `all_special_ids` and `decode(skip_special_tokens=True)` drops them.
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t != EOS_TOKEN],
        padding_side="left",  # generation pads on the left; training collators may pad either side
        model_max_length=model_max_length,
        model_input_names=["input_ids", "attention_mask"],  # GLM takes no token_type_ids
        clean_up_tokenization_spaces=False,  # keep decode exact
        chat_template=GLM4_CHAT_TEMPLATE,
    )


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
) -> str:
    """The conversation as text, through the tokenizer's chat template (GLM-4 format, see module doc)."""
    return tokenizer.apply_chat_template(
        list(messages),
        tools=list(tools) if tools else None,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
    )


# The tokens GLM-4's chat format is written in: a tokenizer without any of them cannot render a GLM chat.
CHAT_TOKENS: tuple[str, ...] = (
    "[gMASK]",
    "<sop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
)


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"{token} is not in the tokenizer's vocabulary")
    return token_id


def glm_special_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """The id of each GLM chat token and of the eos token (under its own name and under "eos"), read from the
    tokenizer: 0..9 in a tokenizer trained here, 151329..151338 in glm-4-9b-chat-hf's."""
    missing = [t for t in CHAT_TOKENS if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if tokenizer.eos_token is None:
        missing.append("an eos token")
    if missing:
        raise ValueError(
            f"not a GLM-4 tokenizer: it has no {', '.join(missing)} (GLM-4's chat tokens are {', '.join(CHAT_TOKENS)})"
        )
    ids = {t: _token_id(tokenizer, t) for t in CHAT_TOKENS}
    ids[tokenizer.eos_token] = ids["eos"] = _token_id(tokenizer, tokenizer.eos_token)
    return ids


def turn_terminator_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of the tokens that end an assistant turn: ``<|user|>``, ``<|observation|>`` and the tokenizer's eos
    token (``<|endoftext|>`` in GLM-4), looked up in the tokenizer.

    Use them as generation stops (``eos_token_id``), and as the reward position in reward models.
    """
    ids = glm_special_ids(tokenizer)
    return [ids["<|user|>"], ids["<|observation|>"], ids["eos"]]


def glm_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Check that ``tokenizer`` is a GLM-4 tokenizer (its chat tokens and eos token; the error names what is
    missing) and give it this project's chat template, in place, when it has another one.

    Any Hugging Face GLM-4 tokenizer folder works this way: THUDM's glm-4-9b-chat-hf (special tokens at
    151329..151338, GLM-4's official template) as well as the ones trained here. For every conversation the
    official template renders, ours renders the same tokens (tests/test_chat_template_official.py); ours
    also reads OpenAI-style tools and calls, marks the assistant's tokens for the loss mask and can end a
    final turn with the terminator (``end_final_turn``). A tokenizer without a pad token gets its eos token.
    """
    glm_special_ids(tokenizer)
    if tokenizer.chat_template != GLM4_CHAT_TEMPLATE:
        tokenizer.chat_template = GLM4_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_glm_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(folder)`` made ready by ``glm_tokenizer``: any GLM-4 tokenizer folder (a
    model folder of this project, or THUDM's glm-4-9b-chat-hf) with this project's chat template."""
    from transformers import AutoTokenizer

    return glm_tokenizer(AutoTokenizer.from_pretrained(folder))


def renders_nothing(message: Mapping[str, Any]) -> bool:
    """True for a message the template skips: empty content and nothing else to render (no tool calls, no
    tools), as GLM-4's official template skips every message whose content is empty."""
    if message.get("tool_calls") or message.get("tools") is not None:
        return False
    content = message.get("content")
    if isinstance(content, (list, tuple)):
        return not any(
            (p if isinstance(p, str) else p.get("text") if isinstance(p, Mapping) else None) for p in content
        )
    return not content


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    sanitize_control_tokens: bool = True,
) -> dict[str, list[int]]:
    """Token ids of a conversation and the SFT loss mask over what the assistant generates.

    ``input_ids`` is the rendered conversation, plus the eos token (``<|endoftext|>``) when it ends with an
    assistant turn (GLM renders nothing after the last answer, but the model must learn to stop there).
    ``assistant_mask`` is 1 on every token the model generates in an assistant turn and 0 elsewhere:

    - 1: the ``\\n`` after ``<|assistant|>``, the content, a tool call's name / ``\\n`` / JSON, the
      ``<|assistant|>`` tokens *inside* a turn (between its text and its calls, or between consecutive
      assistant messages: the model writes those too, as they are not stops), and the turn's terminator
      (the following ``<|user|>`` / ``<|observation|>``, or the appended eos token);
    - 0: ``[gMASK]<sop>``, system / user / observation text and its role token (unless that token is a
      terminator), the tools turn, and the ``<|assistant|>`` that opens a turn (it is part of the generation
      prompt).

    Messages with empty content render nothing (as in GLM-4's official template) and take no part. Every id
    is read from the tokenizer. With ``sanitize_control_tokens`` (default) a control token written *inside* a
    message or tool (an answer quoting ``<|user|>``) is encoded as plain text, so it can neither end a turn
    early nor shift the mask; without it, ``input_ids`` equal ``tokenizer(render_chat(...))`` (+ the final
    eos). Built one message at a time by encoding growing prefixes of the conversation; every message starts
    with a special token written by the template, so no BPE merge crosses a boundary, and the function
    checks that the ids of each prefix are a prefix of the ids of the next (it raises otherwise).
    """
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    messages = [m for m in messages if not renders_nothing(m)]  # the template skips them too
    if not messages:
        raise ValueError("encode_chat needs at least one message with content")
    special = glm_special_ids(tokenizer)
    assistant_id, eos_id = special["<|assistant|>"], special["eos"]
    terminators = set(turn_terminator_ids(tokenizer))

    def encode(prefix: list[dict[str, Any]]) -> list[int]:
        return tokenizer.apply_chat_template(
            prefix,
            tools=list(tools) if tools else None,
            tokenize=True,
            return_dict=False,
            sanitize_control_tokens=sanitize_control_tokens,
        )

    input_ids: list[int] = []
    assistant_mask: list[int] = []
    for i, message in enumerate(messages):
        role = message.get("role")
        ids = encode(messages[: i + 1])
        if ids[: len(input_ids)] != input_ids:
            raise ValueError(f"chat template is not prefix-stable at message {i} ({role})")
        piece = ids[len(input_ids) :]
        if not piece:
            raise ValueError(f"message {i} ({role}) renders no tokens")
        if i > 0 and messages[i - 1].get("role") == "assistant":
            # The first token of this piece is what the model emitted to end the assistant turn before it.
            if role == "assistant":  # same turn goes on: <|assistant|> is generated, not a stop
                if piece[0] != assistant_id:
                    raise ValueError(f"assistant message {i} does not start with <|assistant|>")
                piece_mask = [1] * len(piece)
            else:
                if piece[0] not in terminators:
                    raise ValueError(
                        f"message {i} ({role}) after an assistant turn starts with no terminator"
                    )
                piece_mask = [1] + [0] * (len(piece) - 1)
        elif role == "assistant":
            # 0 up to the opening <|assistant|> (the first piece also holds [gMASK]<sop> and a tools turn).
            if assistant_id not in piece:
                raise ValueError(f"assistant message {i} renders no <|assistant|> token")
            opener = piece.index(assistant_id)
            piece_mask = [0] * (opener + 1) + [1] * (len(piece) - opener - 1)
        else:
            piece_mask = [0] * len(piece)
        input_ids += piece
        assistant_mask += piece_mask

    # input_ids is now exactly the encoding of the whole conversation (its last prefix), and the check above
    # made sure that every earlier prefix encoded to a prefix of it, so each mask piece lines up with its message.
    if messages[-1].get("role") == "assistant":
        input_ids.append(eos_id)
        assistant_mask.append(1)
    return {"input_ids": input_ids, "assistant_mask": assistant_mask}


def encode_response(
    tokenizer, prompt: Sequence[Mapping[str, Any]], response: str, terminator: str | None = "<|endoftext|>"
) -> list[int]:
    """Token ids of ``prompt + [assistant response]`` with the GLM-4 chat template, then the terminator.

    The same ids as ``pretrain.tokenizer.encode_chat(...)["input_ids"]`` (tested) in one template render
    instead of one per message; control tokens inside text are escaped, so the last token is the only
    terminator of the judged turn and the reward position is always ``len(ids) - 1``. ``terminator``: the
    name of the turn terminator appended, its id read from the tokenizer (``<|endoftext|>``, GLM-4's eos, or
    ``<|user|>``, which ends a turn a user follows up on), or None to end at the answer's last token.
    """
    messages = [*({k: v for k, v in m.items() if v is not None} for m in prompt)]
    messages.append({"role": "assistant", "content": response})
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=False, sanitize_control_tokens=True
    )
    return list(ids) + ([_token_id(tokenizer, terminator)] if terminator else [])
