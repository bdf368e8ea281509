"""Byte-level BPE tokenizer with GLM-4's special tokens and chat template.

GLM-4 facts this file encodes (see DESIGN.md, "GLM facts the code must get right"):

- Ten special tokens, ids 0..9 in a trained tokenizer, in GLM's order (``SPECIAL_TOKENS``).
- The chat template writes ``[gMASK]<sop>`` once, then ``<|role|>\\n{content}`` per message with no
  newline after the content. The tokenizer itself adds nothing (no post-processor), so encoding a
  rendered conversation never doubles ``[gMASK]<sop>``.
- There is no end-of-turn token. An assistant turn ends when the model emits the next role token it
  stops on (``<|user|>``, ``<|observation|>``) or ``<|endoftext|>`` (``TURN_TERMINATORS``). The loss
  mask (``encode_chat``), reward positions and generation stops must all use that terminator.

Rendered format (one example, tools omitted)::

    [gMASK]<sop><|system|>\\nYou are terse.<|user|>\\nHi<|assistant|>\\nHello!<|user|>\\n2+2?<|assistant|>

- generation prompt: ``<|assistant|>``; the model then generates ``\\n{answer}`` and a terminator.
- tool call: ``<|assistant|>{name}\\n{json arguments}`` (no newline after ``<|assistant|>``: the first
  line the model writes is the tool name, empty for a plain answer); text before a call and parallel
  calls are separate ``<|assistant|>`` segments of the same turn.
- tool result (role ``tool`` or ``observation``): ``<|observation|>\\n{content}``.
- tools (``tools=[...]``, OpenAI / ``transformers`` JSON schemas) are listed at the end of the first
  system turn; a system turn is created for them when the conversation has none.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
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


# The GLM-4 chat template (our own text; same rendered format as THUDM's glm-4-9b-chat). Role tokens are
# literals, never built from the role string, so `apply_chat_template(..., sanitize_control_tokens=True)`
# can escape control tokens inside message text. `{% generation %}` marks what the model generates in an
# assistant turn: everything after the opening `<|assistant|>` and the terminating role token that follows
# (the final `<|endoftext|>` is not rendered; `encode_chat` appends it). Every tag strips the whitespace in
# front of it, so all output comes from the `{{ }}` expressions.
GLM4_CHAT_TEMPLATE = r"""
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
{%- macro render_tools(tools) -%}
    {{- '# Available tools' -}}
    {%- for tool in tools -%}
        {%- set fn = tool.function if tool.function is defined else tool -%}
        {{- '\n\n## ' + fn.name + '\n\n' + (fn | tojson(indent=4)) -}}
    {%- endfor -%}
    {{- '\n\nTo call a tool, write its name on the first line and its arguments as one JSON object on the next.' -}}
{%- endmacro -%}
{%- macro render_call(call) -%}
    {%- set fn = call.function if call.function is defined else call -%}
    {{- fn.name + '\n' -}}
    {%- if fn.arguments is string -%}
        {{- fn.arguments -}}
    {%- else -%}
        {{- fn.arguments | tojson -}}
    {%- endif -%}
{%- endmacro -%}
{{- '[gMASK]<sop>' -}}
{%- if tools and not (messages and messages[0].role == 'system') -%}
    {{- '<|system|>\n' + render_tools(tools) -}}
{%- endif -%}
{%- for message in messages -%}
    {%- set after_assistant = not loop.first and messages[loop.index0 - 1].role == 'assistant' -%}
    {%- if message.role == 'system' -%}
        {%- if after_assistant -%}
            {{- raise_exception('A system message cannot follow an assistant message: <|system|> does not end a GLM assistant turn.') -}}
        {%- endif -%}
        {{- '<|system|>\n' + render_text(message.content) -}}
        {%- if loop.first and tools -%}
            {{- '\n\n' + render_tools(tools) -}}
        {%- endif -%}
    {%- elif message.role == 'user' -%}
        {%- if after_assistant -%}
            {%- generation -%}{{- '<|user|>' -}}{%- endgeneration -%}
        {%- else -%}
            {{- '<|user|>' -}}
        {%- endif -%}
        {{- '\n' + render_text(message.content) -}}
    {%- elif message.role == 'tool' or message.role == 'observation' -%}
        {%- if after_assistant -%}
            {%- generation -%}{{- '<|observation|>' -}}{%- endgeneration -%}
        {%- else -%}
            {{- '<|observation|>' -}}
        {%- endif -%}
        {{- '\n' + render_text(message.content) -}}
    {%- elif message.role == 'assistant' -%}
        {%- if not after_assistant -%}
            {{- '<|assistant|>' -}}
        {%- endif -%}
        {%- generation -%}
            {%- if after_assistant -%}
                {{- '<|assistant|>' -}}
            {%- endif -%}
            {%- set text = render_text(message.content) -%}
            {%- if text or not message.tool_calls -%}
                {{- '\n' + text -}}
                {%- for call in message.tool_calls or [] -%}
                    {{- '<|assistant|>' + render_call(call) -}}
                {%- endfor -%}
            {%- else -%}
                {%- for call in message.tool_calls -%}
                    {%- if not loop.first -%}
                        {{- '<|assistant|>' -}}
                    {%- endif -%}
                    {{- render_call(call) -}}
                {%- endfor -%}
            {%- endif -%}
        {%- endgeneration -%}
    {%- else -%}
        {{- raise_exception('Unknown role ' + message.role + ': expected system, user, assistant, tool or observation.') -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant|>' -}}
{%- endif -%}
"""


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


def turn_terminator_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of the tokens that end an assistant turn: ``<|user|>``, ``<|observation|>``, ``<|endoftext|>``.

    Use them as generation stops (``eos_token_id``), and as the reward position in reward models.
    """
    return [_token_id(tokenizer, t) for t in TURN_TERMINATORS]


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"{token} is not in the tokenizer's vocabulary")
    return token_id


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    sanitize_control_tokens: bool = True,
) -> dict[str, list[int]]:
    """Token ids of a conversation and the SFT loss mask over what the assistant generates.

    ``input_ids`` is the rendered conversation, plus ``<|endoftext|>`` when it ends with an assistant
    turn (GLM renders nothing after the last answer, but the model must learn to stop there).
    ``assistant_mask`` is 1 on every token the model generates in an assistant turn and 0 elsewhere:

    - 1: the ``\\n`` after ``<|assistant|>``, the content, a tool call's name / ``\\n`` / JSON, the
      ``<|assistant|>`` tokens *inside* a turn (between its text and its calls, or between consecutive
      assistant messages: the model writes those too, as they are not stops), and the turn's terminator
      (the following ``<|user|>`` / ``<|observation|>``, or the appended ``<|endoftext|>``);
    - 0: ``[gMASK]<sop>``, system / user / observation text and its role token (unless that token is a
      terminator), and the ``<|assistant|>`` that opens a turn (it is part of the generation prompt).

    With ``sanitize_control_tokens`` (default) a control token written *inside* a message or tool
    (an answer quoting ``<|user|>``) is encoded as plain text, so it can neither end a turn early nor
    shift the mask; without it, ``input_ids`` equal ``tokenizer(render_chat(...))`` (+ the final eos).
    Built one message at a time by encoding growing prefixes of the conversation; every message starts
    with a special token written by the template, so no BPE merge crosses a boundary, and the function
    checks that the ids of each prefix are a prefix of the ids of the next (it raises otherwise).
    """
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    if not messages:
        raise ValueError("encode_chat needs at least one message")
    assistant_id = _token_id(tokenizer, "<|assistant|>")
    eos_id = _token_id(tokenizer, EOS_TOKEN)
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
    """Token ids of ``prompt + [assistant response]`` with the GLM-4 chat template, then ``<|endoftext|>``.

    The same ids as ``pretrain.tokenizer.encode_chat(...)["input_ids"]`` (tested) in one template render
    instead of one per message; control tokens inside text are escaped, so the last token is the only
    terminator of the judged turn and the reward position is always ``len(ids) - 1``. ``terminator``: the
    turn terminator appended (``<|endoftext|>``, or ``<|user|>``, which ends a turn a user follows up on),
    or None to end at the answer's last token.
    """
    messages = [*({k: v for k, v in m.items() if v is not None} for m in prompt)]
    messages.append({"role": "assistant", "content": response})
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=False, sanitize_control_tokens=True
    )
    return list(ids) + ([tokenizer.convert_tokens_to_ids(terminator)] if terminator else [])
