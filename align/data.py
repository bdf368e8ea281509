"""Chat data for the alignment stages (SFT, DPO, PPO, GRPO): the embedded world's prompts and conversations,
readers for real SFT files, and their tokenisation with the GLM-4 chat template.

A conversation is a list of GLM chat messages (the roles of ``pretrain/tokenizer.py``'s template)::

    {"role": "system" | "user" | "assistant" | "observation", "content": str}
    {"role": "assistant", "content": "" or text, "tool_calls": [{"type": "function",
                                                                 "function": {"name": str, "arguments": {...}}}]}

A ``Conversation`` is such a list plus the tools the assistant was offered (JSON schemas in the OpenAI /
``transformers`` form, ``None`` when there are none) and where it came from (file and row).

World (the embedded default, ``pretrain/world/``):
    world_prompts(world, split, n, seed) -> list[Prompt]
    prompt_messages(prompts) -> list[list[dict]]                  (the chat prompt of each, copied)
    world_sft_conversations(world, n, seed, split="train") -> list[list[dict]]

Files (``read_sft``; every error names the file, the 1-based row and the field):
    alpaca     {instruction, input, output}  (+ optional system and history: [[user, assistant], ...])
    oasst_zh   the same reader: {instruction, input, output, history} (OASST1-zh as LLaMA-Factory ships it)
    sharegpt   {conversations: [{from, value}], tools, system?}: human / gpt / function_call / observation
               (glaive function-calling chats); a function_call becomes an assistant tool call, an
               observation an ``observation`` turn, ``tools`` (a JSON string or list) the offered tools
    messages   {messages: [{role, content, tool_calls?}], tools?} (TRL's conversational rows), or GLM-4's own
               form: tools in the first (system) message, {role: assistant, metadata: NAME, content: ARGS}

Tokens:
    encode_conversation(tokenizer, conversation) -> {"input_ids", "assistant_masks"}
        via ``pretrain.tokenizer.encode_chat``: 1 on what the model generates in assistant turns, including
        each turn's terminator (the next ``<|user|>`` / ``<|observation|>``, or the final ``<|endoftext|>``).
    parse_assistant_text(text) -> message: the inverse of the template for one generated assistant turn
        (plain text, or ``name\\n{json}`` tool calls separated by ``<|assistant|>``).
"""

from __future__ import annotations

import json
import random
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from glmwb.pretrain.errors import ConfigError

if TYPE_CHECKING:
    from glmwb.pretrain.world import Prompt, World

FORMATS = ("auto", "alpaca", "oasst_zh", "sharegpt", "messages")
ROLES = ("system", "user", "assistant", "observation", "tool")
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "call",  # an assistant tool call, merged into the assistant turn it belongs to
    "observation": "observation",
    "function": "observation",
    "tool": "observation",
    "system": "system",
}


class SFTDataError(ConfigError):
    """A malformed SFT row: the message names the file, the 1-based row and the field."""


@dataclass(frozen=True)
class Conversation:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None  # offered tool schemas, rendered into the first system turn
    where: str = ""  # "FILE, row N", for error messages


@dataclass
class SFTFile:
    conversations: list[Conversation] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one error message per row left out (skip_invalid)
    format: str = ""


# ----------------------------------------------------------------------------------------------------------
# The embedded world


def world_prompts(world: World, split: str, n: int, seed: int) -> list[Prompt]:
    """``n`` distinct prompts of ``split`` ("train" | "heldout"); see ``World.prompts``."""
    return world.prompts(split, n, seed=seed)


def prompt_messages(prompts: Iterable[Prompt]) -> list[list[dict[str, str]]]:
    """The chat messages of each prompt (optional system turn, then the user turn), as fresh copies."""
    return [[dict(m) for m in p.messages] for p in prompts]


def world_sft_conversations(
    world: World, n: int, seed: int, split: str = "train", multi_turn: float = 0.2, answers: str = "reference"
) -> list[list[dict[str, str]]]:
    """``n`` conversations whose assistant turns are the world's correct, concise answers.

    Each conversation takes one prompt (with its system turn, when it has one) and, with probability
    ``multi_turn``, one or two more prompts of the same language as follow-up user turns (their own system
    turns dropped). Every assistant turn is a correct, concise answer in the question's language:
    ``answers="reference"`` the prompt's reference answer (the first "say" sentence, which restates the
    question: "7 + 5 = 12.", "Zorven likes red."), ``"varied"`` the ``correct`` candidate of
    ``world.responses(prompt, seed)`` (any phrasing, also the bare value: "12", "Red."). Distinct prompts throughout. Training uses ``split="train"`` (instances and
    phrasings the held-out evaluation never asks); ``"heldout"`` is for held-out losses only.
    """
    if answers not in ("reference", "varied"):
        raise ValueError(f"answers must be 'reference' or 'varied', got {answers!r}")
    if not 0.0 <= multi_turn <= 1.0:
        raise ValueError(f"multi_turn must be in [0, 1], got {multi_turn}")
    rng = random.Random(f"sft-conversations|{seed}|{split}")
    turns = [1 if rng.random() >= multi_turn else rng.choice((2, 3)) for _ in range(n)]
    prompts = world.prompts(split, sum(turns), seed=seed)
    order = deque(prompts)
    by_lang: dict[str, deque] = {lang: deque(p for p in prompts if p.lang == lang) for lang in ("en", "zh")}
    used: set[str] = set()
    conversations = []
    for k in turns:
        while order[0].id in used:
            order.popleft()
        queue = by_lang[order[0].lang]
        messages: list[dict[str, str]] = []
        for i in range(k):
            if not queue:
                break
            prompt = queue.popleft()
            used.add(prompt.id)
            turn = [dict(m) for m in prompt.messages if i == 0 or m["role"] != "system"]
            if answers == "reference":
                answer = prompt.reference
            else:
                answer = next(r.text for r in world.responses(prompt, seed=seed) if r.kind == "correct")
            messages += [*turn, {"role": "assistant", "content": answer}]
        conversations.append(messages)
    return conversations


# ----------------------------------------------------------------------------------------------------------
# Checking messages


def _tool_call(call: Any, where: str, place: str) -> dict[str, Any]:
    """A tool call in the OpenAI form {"type": "function", "function": {"name", "arguments"}}."""
    fn = call.get("function", call) if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
        raise SFTDataError(f"{where}: {place} must be an object with a non-empty string 'name'")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise SFTDataError(
                f"{where}: {place}.arguments is a string but not JSON: {args[:80]!r}"
            ) from None
    if not isinstance(args, Mapping):
        raise SFTDataError(f"{where}: {place}.arguments must be a JSON object, got {type(args).__name__}")
    if "\n" in fn["name"]:
        raise SFTDataError(f"{where}: {place}.name must be one line (GLM writes it on the first line)")
    return {"type": "function", "function": {"name": fn["name"], "arguments": dict(args)}}


def check_messages(
    messages: Any, where: str, field_name: str = "messages", places: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Validate a conversation and return it normalised (tool calls in the OpenAI form, no None fields).

    Rules: a non-empty list of {role, content} objects; roles system / user / assistant / observation / tool;
    a system turn only first (``<|system|>`` does not end an assistant turn); text content (an assistant
    turn may have empty content when it calls tools); an observation only after a tool call or another
    observation; at least one assistant turn with something to learn. ``places`` names each message in
    errors (default ``messages[i]``; the readers pass the row field each message came from)."""
    if not isinstance(messages, list) or not messages:
        raise SFTDataError(f"{where}: field {field_name!r} must be a non-empty list of messages")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        place = places[i] if places is not None else f"{field_name}[{i}]"
        if not isinstance(m, Mapping):
            raise SFTDataError(f"{where}: {place} must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise SFTDataError(f"{where}: {place}.role must be one of {', '.join(ROLES)}, got {role!r}")
        content = m.get("content")
        calls = m.get("tool_calls") or []
        metadata = m.get(
            "metadata"
        )  # GLM-4's own form of a call: the tool name, the JSON arguments as content
        if metadata is not None:
            if (
                role != "assistant"
                or not isinstance(metadata, str)
                or not metadata.strip()
                or "\n" in metadata
            ):
                raise SFTDataError(
                    f"{where}: {place}.metadata must be a one-line tool name on an assistant message "
                    f"(GLM-4's form of a call), got {metadata!r:.60} on a {role!r} message"
                )
            if calls:
                raise SFTDataError(f"{where}: {place} has both metadata and tool_calls; give a call one way")
        if "tools" in m and not (role == "system" and i == 0):
            raise SFTDataError(f"{where}: {place} has tools; they belong in the first (system) message")
        if role == "assistant" and calls:
            if not isinstance(calls, list):
                raise SFTDataError(f"{where}: {place}.tool_calls must be a list")
            calls = [_tool_call(c, where, f"{place}.tool_calls[{j}]") for j, c in enumerate(calls)]
            content = "" if content is None else content
        elif calls:
            raise SFTDataError(
                f"{where}: {place} has tool_calls but role {role!r} (only assistant turns call)"
            )
        if not isinstance(content, str):
            raise SFTDataError(f"{where}: {place}.content must be a string, got {type(content).__name__}")
        if role == "system" and i > 0:
            raise SFTDataError(f"{where}: {place} is a system turn that is not the first message")
        if role in ("observation", "tool") and not (
            out
            and (
                out[-1].get("tool_calls")
                or out[-1].get("metadata")
                or out[-1]["role"] in ("observation", "tool")
            )
        ):
            raise SFTDataError(f"{where}: {place} is an observation that follows no tool call")
        if metadata is not None and not content.strip():
            raise SFTDataError(
                f"{where}: {place} is a call of {metadata!r} with no arguments (content is empty)"
            )
        if role == "assistant" and not content.strip() and not calls:
            raise SFTDataError(f"{where}: {place}.content is empty (an assistant turn with nothing to learn)")
        if role != "assistant" and role != "system" and not content.strip():
            raise SFTDataError(f"{where}: {place}.content is empty")
        msg: dict[str, Any] = {"role": role, "content": content}
        if calls:
            msg["tool_calls"] = calls
        if metadata is not None:
            msg["metadata"] = metadata
        out.append(msg)
    if not any(m["role"] == "assistant" for m in out):
        raise SFTDataError(f"{where}: field {field_name!r} has no assistant turn (nothing to train on)")
    return out


def _tools(value: Any, where: str) -> list[dict[str, Any]] | None:
    """Tool schemas from a JSON string or a list; each wrapped as {"type": "function", "function": {...}}."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise SFTDataError(f"{where}: field 'tools' is a string but not JSON: {e}") from None
    if not isinstance(value, list):
        raise SFTDataError(
            f"{where}: field 'tools' must be a list of tool schemas, got {type(value).__name__}"
        )
    tools = []
    for i, tool in enumerate(value):
        fn = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise SFTDataError(f"{where}: field 'tools'[{i}] must be a schema object with a string 'name'")
        tools.append({"type": "function", "function": dict(fn)})
    return tools or None


# ----------------------------------------------------------------------------------------------------------
# Row formats -> Conversation


def _require(row: Any, keys: Sequence[str], where: str) -> Mapping[str, Any]:
    if not isinstance(row, Mapping):
        raise SFTDataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    for key in keys:
        if key not in row:
            raise SFTDataError(f"{where}: missing field {key!r} (has {sorted(row)})")
    return row


def _text(row: Mapping[str, Any], key: str, where: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise SFTDataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise SFTDataError(f"{where}: field {key!r} is empty")
    return value


def alpaca_conversation(row: Any, where: str) -> Conversation:
    """Alpaca / OASST1-zh rows: [system], history pairs, then instruction (+ "\\n" + input) -> output."""
    row = _require(row, ("instruction", "output"), where)
    messages: list[dict[str, Any]] = []
    places: list[str] = []
    system = _text(row, "system", where, required=False)
    if system.strip():
        messages.append({"role": "system", "content": system})
        places.append("field 'system'")
    history = row.get("history") or []
    if not isinstance(history, list):
        raise SFTDataError(f"{where}: field 'history' must be a list of [user, assistant] pairs")
    for i, turn in enumerate(history):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise SFTDataError(f"{where}: field 'history'[{i}] must be [user text, assistant text]")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
        places += [f"field 'history'[{i}][0]", f"field 'history'[{i}][1]"]
    instruction = _text(row, "instruction", where, required=False)
    extra = _text(row, "input", where, required=False)
    user = "\n".join(t for t in (instruction, extra) if t.strip())
    if not user:
        raise SFTDataError(f"{where}: fields 'instruction' and 'input' are both empty")
    messages += [
        {"role": "user", "content": user},
        {"role": "assistant", "content": _text(row, "output", where)},
    ]
    return Conversation(check_messages(messages, where, "history"), None, where)


def sharegpt_conversation(row: Any, where: str) -> Conversation:
    """ShareGPT / glaive rows. A ``function_call`` value is ``{"name", "arguments"}`` JSON; it joins the assistant
    turn before it (text, then the call) or starts one; consecutive calls are parallel calls of one turn."""
    row = _require(row, ("conversations",), where)
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise SFTDataError(
            f"{where}: field 'conversations' must be a non-empty list of {{from, value}} turns"
        )
    messages: list[dict[str, Any]] = []
    places: list[str] = []  # the row field each message came from, for errors
    system = _text(row, "system", where, required=False)
    if system.strip():
        messages.append({"role": "system", "content": system})
        places.append("field 'system'")
    for i, turn in enumerate(turns):
        place = f"conversations[{i}]"
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise SFTDataError(f"{where}: {place} must be an object with 'from' and 'value'")
        role = _SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise SFTDataError(
                f"{where}: {place}.from must be one of {', '.join(_SHAREGPT_ROLES)}, got {turn['from']!r}"
            )
        value = turn["value"]
        if not isinstance(value, str):
            raise SFTDataError(f"{where}: {place}.value must be a string, got {type(value).__name__}")
        if role != "call":
            messages.append({"role": role, "content": value})
            places.append(place)
            continue
        try:
            call = json.loads(value)
        except json.JSONDecodeError:
            raise SFTDataError(
                f"{where}: {place}.value (a function_call) is not JSON: {value[:80]!r}"
            ) from None
        call = _tool_call(call, where, f"{place}.value")
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant":
            last.setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
    return Conversation(
        check_messages(messages, where, "conversations"), _tools(row.get("tools"), where), where
    )


def messages_conversation(row: Any, where: str) -> Conversation:
    """TRL / OpenAI conversational rows, ``{"messages": [...], "tools": [...]?}``, and GLM-4's own form: the tools
    inside the first (system) message, a call as ``{"role": "assistant", "metadata": NAME, "content": ARGS}``,
    results as role ``observation`` (both render the same tokens)."""
    row = _require(row, ("messages",), where)
    messages = row["messages"]
    tools = row.get("tools")
    first = (
        messages[0] if isinstance(messages, list) and messages and isinstance(messages[0], Mapping) else {}
    )
    if first.get("role") == "system" and first.get("tools") is not None:
        if tools is not None:
            raise SFTDataError(
                f"{where}: tools are given both in field 'tools' and in messages[0]; give them once"
            )
        tools = first["tools"]
        messages = [{k: v for k, v in first.items() if k != "tools"}, *messages[1:]]
    return Conversation(check_messages(messages, where), _tools(tools, where), where)


READERS = {
    "alpaca": alpaca_conversation,
    "oasst_zh": alpaca_conversation,
    "sharegpt": sharegpt_conversation,
    "messages": messages_conversation,
}


def detect_format(row: Any, where: str) -> str:
    if isinstance(row, Mapping):
        if "conversations" in row:
            return "sharegpt"
        if "messages" in row:
            return "messages"
        if "instruction" in row and "output" in row:
            return "oasst_zh" if "history" in row else "alpaca"
    keys = sorted(row) if isinstance(row, Mapping) else type(row).__name__
    raise SFTDataError(
        f"{where}: cannot tell the SFT format from {keys}; expected alpaca {{instruction, input, output}}, "
        "oasst_zh (+ history), sharegpt {conversations, tools} or messages {messages}; set data.format"
    )


def read_sft(path: str | Path, format: str = "auto", skip_invalid: bool = False) -> SFTFile:
    """Conversations from a JSONL / JSON array file (``.gz`` allowed), a parquet file or a ``datasets`` folder.

    ``format="auto"`` decides from the first row. A malformed row raises ``SFTDataError`` naming the file, the
    row and the field, or with ``skip_invalid`` is left out and its message kept in ``skipped``."""
    from glmwb.annotation.preference_data import iter_rows
    from glmwb.annotation.records import PreferenceDataError

    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"SFT data not found: {path}")
    result = SFTFile(format=format)
    reader = None if format == "auto" else READERS[format]
    try:
        for where, row in iter_rows(path):
            try:
                if isinstance(row, Exception):
                    raise SFTDataError(str(row))
                if reader is None:
                    result.format = detect_format(row, where)
                    reader = READERS[result.format]
                result.conversations.append(reader(row, where))
            except SFTDataError as e:
                if not skip_invalid:
                    raise
                result.skipped.append(str(e))
    except PreferenceDataError as e:  # a file-level problem found by iter_rows
        raise SFTDataError(str(e)) from None
    if not result.conversations:
        raise SFTDataError(f"{path}: no usable conversations ({len(result.skipped)} rows skipped)")
    return result


# ----------------------------------------------------------------------------------------------------------
# Tokens


def encode_conversation(
    tokenizer, conversation: Conversation | Sequence[Mapping[str, Any]]
) -> dict[str, list[int]]:
    """``input_ids`` and ``assistant_masks`` (TRL's column name) of one conversation, via ``encode_chat``:
    the loss covers exactly what the model generates in assistant turns, each turn's terminator included."""
    from glmwb.pretrain.tokenizer import encode_chat

    if not isinstance(conversation, Conversation):
        conversation = Conversation(list(conversation))
    enc = encode_chat(tokenizer, conversation.messages, tools=conversation.tools)
    return {"input_ids": enc["input_ids"], "assistant_masks": enc["assistant_mask"]}


def parse_assistant_text(text: str) -> dict[str, Any]:
    """One generated assistant turn (decoded with special tokens, terminator removed) -> a message.

    The template writes ``\\n{text}`` for an answer and ``{name}\\n{json arguments}`` for a tool call, the
    segments of one turn separated by ``<|assistant|>``; this reads that back. Arguments that are not JSON
    are kept as the string written."""
    segments = text.split("<|assistant|>")
    content = ""
    calls = []
    for i, seg in enumerate(segments):
        if seg.startswith("\n"):
            if i > 0:
                raise ValueError(f"text segment {i} after the first in one assistant turn: {seg[:40]!r}")
            content = seg[1:]
            continue
        name, _, args = seg.partition("\n")
        try:
            arguments: Any = json.loads(args)
        except json.JSONDecodeError:
            arguments = args
        calls.append({"type": "function", "function": {"name": name, "arguments": arguments}})
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return message
