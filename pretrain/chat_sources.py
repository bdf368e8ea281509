"""Chat models that stream their answers: where the comparison app (``ui/arena.py``) gets its two answers.

Two kinds of source, one interface (``ChatSource.stream(messages, sampling) -> AnswerStream``):

- ``LocalChatModel``: a Hugging Face causal-LM folder (ours, or any ``transformers`` model) loaded once in
  this process, its prompts rendered with the folder's own chat template. All users share one
  ``BatchingGenerator``: a worker thread that gathers the requests arriving within ``max_wait_s`` (up to
  ``max_batch``, those with the same sampling parameters together), runs them as one left-padded batch
  through ``transformers``' ``generate`` and hands every row its new text after each decoding step.
- ``OpenAIChatModel``: an OpenAI-compatible chat-completions endpoint (vLLM, SGLang, ``pretrain/chat_server``)
  read as a stream of server-sent events (``"stream": true``; each ``data:`` line a
  ``chat.completion.chunk`` whose ``choices[0].delta.content`` is the next piece; ``data: [DONE]`` ends it).

Every source says what produced its answers (``name``, ``checkpoint``, ``chat_template_sha256``), which the
app stores with each answer.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from glmwb.pretrain.errors import ConfigError

GLM_TURN_TERMINATORS = ("<|user|>", "<|observation|>", "<|endoftext|>")  # GLM has no end-of-turn token


class SourceError(RuntimeError):
    """A model source failed (endpoint down, bad reply); the message is safe to show to a user."""


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters of one answer (greedy when ``temperature == 0``)."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 5.0:
            raise ConfigError(f"temperature must be in [0, 5], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 1 <= self.max_new_tokens <= 32768:
            raise ConfigError(f"max_new_tokens must be in [1, 32768], got {self.max_new_tokens}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AnswerStream:
    """The pieces of one answer as they arrive (iterate it); afterwards ``text`` is the whole answer and
    ``finish_reason`` is "stop" (the model ended its turn) or "length" (``max_new_tokens`` reached).

    Filled by a producer thread with ``put`` / ``finish`` / ``fail``; read by one consumer."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.text = ""
        self.tokens = 0  # generated tokens (an endpoint: its reported usage, else its content chunks)
        self.finish_reason: str | None = None
        self.error: str | None = None

    # producer side
    def put(self, piece: str) -> None:
        if piece:
            self._queue.put(("piece", piece))

    def finish(self, reason: str, tokens: int = 0) -> None:
        self._queue.put(("end", (reason, tokens)))

    def fail(self, message: str) -> None:
        self._queue.put(("error", message))

    # consumer side
    def __iter__(self) -> Iterator[str]:
        while True:
            kind, value = self._queue.get()
            if kind == "piece":
                self.text += value
                yield value
            elif kind == "end":
                self.finish_reason, self.tokens = value
                return
            else:
                self.error = value
                raise SourceError(value)

    def read(self) -> str:
        """Wait for the whole answer."""
        for _ in self:
            pass
        return self.text


class ChatSource(Protocol):
    name: str  # the model's name on the leaderboard
    checkpoint: str | None  # the folder, or endpoint#model
    chat_template_sha256: str | None  # of the template the prompt was rendered with (None: not known here)

    def stream(self, messages: Sequence[Mapping[str, Any]], sampling: Sampling) -> AnswerStream: ...


# ---------------------------------------------------------------------------------------------------------
# A model folder in this process, behind one batching generator.
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Request:
    prompt_ids: list[int]
    sampling: Sampling
    out: AnswerStream
    ids: list[int] = field(default_factory=list)  # generated so far
    sent: str = ""  # text handed out so far
    done: bool = False


class _RowStreamer:
    """``transformers``' streamer protocol for a batch: ``put`` gets the prompt ids (B, T) once, then the
    next token of every row (B,) after each decoding step."""

    def __init__(self, on_step) -> None:
        self.on_step = on_step
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.on_step(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Token ids that end an answer: the generation config's and the tokenizer's EOS, and GLM's turn
    terminators when the vocabulary has them."""
    ids: list[int] = []
    eos = getattr(generation_config, "eos_token_id", None)
    for value in (eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.append(value)
        elif value:
            ids.extend(int(v) for v in value)
    vocab = tokenizer.get_vocab()
    ids.extend(vocab[t] for t in GLM_TURN_TERMINATORS if t in vocab)
    return sorted(set(ids))


class BatchingGenerator:
    """One model folder loaded once, serving every user: ``submit`` queues a chat and returns its stream;
    a worker thread batches what is waiting and decodes it step by step.

    Requests are batched by identical sampling parameters (one ``generate`` call samples all rows alike);
    a batch runs to its end before the next starts (static batching: simple, and enough for a comparison
    app where people read while models write)."""

    def __init__(
        self,
        folder: str | Path,
        max_batch: int = 8,
        max_wait_s: float = 0.02,
        device: str | None = None,
        dtype: str = "auto",
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"{folder}: not a model folder (no config.json)")
        self.folder = folder
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        if not self.tokenizer.chat_template:
            raise ConfigError(
                f"{folder}: the tokenizer has no chat template; the arena renders chats with it"
            )
        self.tokenizer.padding_side = "left"
        self.chat_template_sha256 = hashlib.sha256(self.tokenizer.chat_template.encode()).hexdigest()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = torch.float32 if device == "cpu" and dtype == "auto" else dtype
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype).to(device).eval()
        self.device = device
        self.stop_ids = stop_token_ids(self.tokenizer, self.model.generation_config)
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        )
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.batch_sizes: list[int] = []  # of every batch run (tests and the app's status line read it)
        self._waiting: queue.SimpleQueue = queue.SimpleQueue()
        self._held: list[_Request] = []  # taken from the queue but not yet run (other sampling parameters)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"generate:{folder.name}", daemon=True)
        self._thread.start()

    def render(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def submit(self, messages: Sequence[Mapping[str, Any]], sampling: Sampling) -> AnswerStream:
        out = AnswerStream()
        if self._stop.is_set():
            out.fail(f"{self.folder.name}: the generator is closed")
            return out
        self._waiting.put(_Request(self.render(messages), sampling, out))
        return out

    def close(self) -> None:
        self._stop.set()
        self._waiting.put(None)
        self._thread.join(timeout=30)

    def _gather(self) -> list[_Request]:
        """The next batch: the oldest request, and those with its sampling parameters that arrive within
        ``max_wait_s`` (others are held for a later batch)."""
        if self._held:
            first = self._held.pop(0)
        else:
            first = self._waiting.get()
            if first is None:
                return []
        batch = [first]
        for r in list(self._held):
            if len(batch) < self.max_batch and r.sampling == first.sampling:
                batch.append(r)
                self._held.remove(r)
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                r = self._waiting.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if r is None:  # closing: finish this batch; the next _gather sees the marker again
                self._waiting.put(None)
                break
            (batch if r.sampling == first.sampling else self._held).append(r)
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._gather()
            if not batch:
                for r in self._held:
                    r.out.fail("the generator was closed")
                return
            try:
                self._run(batch)
            except Exception as e:  # noqa: BLE001 - a failed batch fails its requests, not the server
                for r in batch:
                    if not r.done:
                        r.out.fail(f"{self.folder.name}: generation failed ({type(e).__name__}: {e})")

    def _emit(self, r: _Request, final: bool = False) -> None:
        text = self.tokenizer.decode(r.ids, skip_special_tokens=True).lstrip()
        if not final and text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        if text.startswith(r.sent) and len(text) > len(r.sent):
            r.out.put(text[len(r.sent) :])
            r.sent = text

    def _run(self, batch: list[_Request]) -> None:
        import torch
        from transformers import GenerationConfig

        self.batch_sizes.append(len(batch))
        sampling = batch[0].sampling
        width = max(len(r.prompt_ids) for r in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):  # left padding: every row's next token is at the same position
            input_ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            attention_mask[i, width - len(r.prompt_ids) :] = 1
        stops = set(self.stop_ids)

        def on_step(tokens: list[int]) -> None:
            for r, token in zip(batch, tokens, strict=True):
                if r.done:
                    continue
                if token in stops:
                    r.done = True
                    self._emit(r, final=True)
                    r.out.finish("stop", len(r.ids))
                    continue
                r.ids.append(token)
                self._emit(r)

        # Exactly the recorded parameters: a fresh config, so that a folder's generation_config.json (a
        # top_k, a repetition penalty) cannot change the sampling behind the stored provenance.
        config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=sampling.temperature > 0,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            **({"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0, "min_p": 0.0}
               if sampling.temperature > 0 else {}),
        )  # fmt: skip
        with torch.no_grad():
            self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                generation_config=config,
                streamer=_RowStreamer(on_step),
            )
        for r in batch:
            if not r.done:
                r.done = True
                self._emit(r, final=True)
                r.out.finish("length", len(r.ids))


@dataclass
class LocalChatModel:
    """A named model served by a ``BatchingGenerator`` (several names may share one generator)."""

    name: str
    generator: BatchingGenerator

    @property
    def checkpoint(self) -> str:
        return str(self.generator.folder.resolve())

    @property
    def chat_template_sha256(self) -> str:
        return self.generator.chat_template_sha256

    def stream(self, messages: Sequence[Mapping[str, Any]], sampling: Sampling) -> AnswerStream:
        return self.generator.submit(messages, sampling)


# ---------------------------------------------------------------------------------------------------------
# An OpenAI-compatible chat-completions endpoint.
# ---------------------------------------------------------------------------------------------------------


def _sse_data(lines: Iterator[str]) -> Iterator[str]:
    """The ``data`` payloads of a server-sent event stream (multi-line data joined; comments skipped)."""
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


@dataclass
class OpenAIChatModel:
    """``POST {base_url}/chat/completions`` with ``"stream": true``; ``base_url`` ends with ``/v1``.

    ``api_key`` is sent as a bearer token when given. The endpoint renders the chat with its own template,
    which this side cannot see: ``chat_template_sha256`` is None unless the caller states it."""

    name: str
    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 120.0
    chat_template_sha256: str | None = None

    @property
    def checkpoint(self) -> str:
        return f"{self.base_url.rstrip('/')}#{self.model}"

    def stream(self, messages: Sequence[Mapping[str, Any]], sampling: Sampling) -> AnswerStream:
        out = AnswerStream()
        threading.Thread(
            target=self._read, args=(list(messages), sampling, out), name=f"openai:{self.name}", daemon=True
        ).start()
        return out

    def _read(self, messages: list[Mapping[str, Any]], sampling: Sampling, out: AnswerStream) -> None:
        import httpx

        body = {
            "model": self.model,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "stream": True,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_new_tokens,
            "stream_options": {"include_usage": True},
        }
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        url = f"{self.base_url.rstrip('/')}/chat/completions"
        reason, chunks, usage = None, 0, None
        try:
            with httpx.stream("POST", url, json=body, headers=headers, timeout=self.timeout_s) as r:
                if r.status_code != 200:
                    r.read()
                    raise SourceError(f"{self.name}: {url} answered {r.status_code}: {r.text[:200]}")
                for data in _sse_data(r.iter_lines()):
                    if data.strip() == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise SourceError(f"{self.name}: the endpoint reported {chunk['error']}")
                    usage = (chunk.get("usage") or {}).get("completion_tokens", usage)
                    for choice in (chunk.get("choices") or [])[:1]:
                        piece = (choice.get("delta") or {}).get("content") or ""
                        chunks += bool(piece)
                        out.put(piece)
                        reason = choice.get("finish_reason") or reason
        except SourceError as e:
            out.fail(str(e))
            return
        except (httpx.HTTPError, json.JSONDecodeError, AttributeError, TypeError) as e:
            out.fail(f"{self.name}: no answer from {url} ({type(e).__name__}: {e})")
            return
        out.finish(reason or "stop", usage if isinstance(usage, int) else chunks)
