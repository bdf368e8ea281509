"""The arena's model sources: a model folder behind one batching generator (batched answers equal the
answers of our own generate loop, one prompt at a time), and an OpenAI-compatible endpoint read as a
stream of server-sent events from our small server (``pretrain/chat_server``) serving the same model."""

from __future__ import annotations

import threading

import httpx
import pytest

from glmwb.pretrain.chat_server import openai_chat_app
from glmwb.pretrain.chat_sources import (
    BatchingGenerator,
    LocalChatModel,
    OpenAIChatModel,
    Sampling,
    SourceError,
    _sse_data,
)
from tests.annotation.conftest import ThreadServer, free_port
from tests.tiny import one_thread  # noqa: F401 (autouse)

PROMPTS = [
    [{"role": "user", "content": "How is the weather in Beijing today?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "请写一首关于大海的短诗。"},
    ],
    [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Numbers like 12 and 345?"},
    ],
]
GREEDY = Sampling(temperature=0.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def generator(tiny_glm_folder):
    g = BatchingGenerator(tiny_glm_folder, max_batch=8, max_wait_s=0.3)
    yield g
    g.close()


@pytest.fixture(scope="module")
def reference_answers(tiny_glm_folder):
    """Greedy answers from our own model and decoding loop (pretrain/generate.py), one prompt at a time."""
    from glmwb.pretrain.generate import generate_answers, load_policy

    model, tok = load_policy(tiny_glm_folder)
    return [generate_answers(model, tok, [p], max_new_tokens=GREEDY.max_new_tokens)[0] for p in PROMPTS]


def test_concurrent_requests_share_a_batch_and_match_unbatched_answers(generator, reference_answers):
    assert any(reference_answers), "the tiny model answers nothing: the comparison below would be empty"
    before = len(generator.batch_sizes)
    streams = [None] * len(PROMPTS)
    pieces: list[list[str]] = [[] for _ in PROMPTS]

    def ask(i: int) -> None:
        streams[i] = generator.submit(PROMPTS[i], GREEDY)
        pieces[i] = list(streams[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert generator.batch_sizes[before:] == [3]  # one batch for the three users
    for i, stream in enumerate(streams):
        assert stream.text == "".join(pieces[i])
        assert stream.text.strip() == reference_answers[i]  # left padding changes nothing
        assert stream.finish_reason in ("stop", "length")
    assert max(len(p) for p in pieces) > 1  # streamed in pieces, not in one go


def test_requests_with_other_sampling_wait_for_their_own_batch(generator):
    before = len(generator.batch_sizes)
    a = generator.submit(PROMPTS[0], GREEDY)
    b = generator.submit(PROMPTS[1], Sampling(temperature=0.9, max_new_tokens=4))
    c = generator.submit(PROMPTS[2], GREEDY)
    for s in (a, b, c):
        s.read()
    assert sorted(generator.batch_sizes[before:]) == [1, 2]
    assert len(b.text) > 0 or b.finish_reason == "stop"


def test_a_folder_that_is_not_a_model_is_refused(tmp_path):
    from glmwb.pretrain.errors import ConfigError

    with pytest.raises(ConfigError, match="no config.json"):
        BatchingGenerator(tmp_path)


@pytest.fixture(scope="module")
def endpoint(generator):
    app = openai_chat_app({"tiny": LocalChatModel("tiny", generator)}, chunk_delay_s=0.0)
    server = ThreadServer(app, health="/v1/models")
    yield server.base_url
    server.stop()


def test_openai_client_streams_the_same_answer(endpoint, generator, reference_answers):
    client = OpenAIChatModel("tiny-remote", f"{endpoint}/v1", "tiny")
    stream = client.stream(PROMPTS[0], GREEDY)
    pieces = list(stream)
    assert stream.text.strip() == reference_answers[0] and len(pieces) > 1
    assert stream.finish_reason in ("stop", "length")
    assert client.checkpoint == f"{endpoint}/v1#tiny" and client.chat_template_sha256 is None
    local = generator.submit(PROMPTS[0], GREEDY)
    local.read()
    assert 0 < local.tokens <= GREEDY.max_new_tokens
    assert stream.tokens == local.tokens  # the endpoint's usage report


def test_the_server_speaks_the_chat_completions_shape(endpoint, reference_answers):
    body = {"model": "tiny", "messages": PROMPTS[0], "temperature": 0, "max_tokens": GREEDY.max_new_tokens}
    with httpx.stream("POST", f"{endpoint}/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(_sse_data(r.iter_lines()))
    import json

    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text.strip() == reference_answers[0]
    whole = httpx.post(f"{endpoint}/v1/chat/completions", json=body, timeout=60).json()
    assert whole["choices"][0]["message"]["content"].strip() == reference_answers[0]
    bad = httpx.post(f"{endpoint}/v1/chat/completions", json={**body, "temperature": 9})
    assert bad.status_code == 400 and "temperature" in bad.json()["error"]["message"]
    unknown = httpx.post(f"{endpoint}/v1/chat/completions", json={**body, "model": "nope"})
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]["message"]


def test_endpoint_failures_are_one_clear_error(endpoint):
    with pytest.raises(SourceError, match="404"):
        OpenAIChatModel("x", f"{endpoint}/v1", "nope").stream(PROMPTS[0], GREEDY).read()
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(SourceError, match="no answer from"):
        OpenAIChatModel("x", dead, "tiny", timeout_s=5).stream(PROMPTS[0], GREEDY).read()


def test_sse_parser_joins_multi_line_data_and_skips_comments():
    lines = [": keep-alive", "data: a", "data: b", "", "event: x", "data: c", ""]
    assert list(_sse_data(iter(lines))) == ["a\nb", "c"]


def test_close_finishes_what_was_asked_and_refuses_the_rest(tiny_glm_folder):
    g = BatchingGenerator(tiny_glm_folder, max_wait_s=0.0)
    asked = [g.submit(PROMPTS[0], GREEDY), g.submit(PROMPTS[1], Sampling(temperature=0.5, max_new_tokens=3))]
    g.close()
    assert not g._thread.is_alive()
    assert [s.read() is not None for s in asked] == [True, True]  # both answered before the worker ended
    with pytest.raises(SourceError, match="closed"):
        g.submit(PROMPTS[0], GREEDY).read()


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_llama_folder(tiny_tokenizer, tmp_path_factory):
    """Another architecture with another chat template: a tiny random Llama whose tokenizer renders ChatML."""
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = CHATML
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("tiny_llama")
    model = LlamaForCausalLM(config).eval()
    model.generation_config.repetition_penalty = 3.0  # a folder default the arena must not apply silently
    model.generation_config.do_sample, model.generation_config.top_k = True, 2
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_any_transformers_model_with_its_own_chat_template(tiny_llama_folder, tiny_glm_folder):
    import hashlib

    import torch
    from transformers import AutoModelForCausalLM

    g = BatchingGenerator(tiny_llama_folder, max_wait_s=0.0)
    try:
        assert g.chat_template_sha256 == hashlib.sha256(CHATML.encode()).hexdigest()
        assert type(g.model).__name__ == "LlamaForCausalLM"
        text = g.tokenizer.decode(g.render(PROMPTS[1]))
        assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>") and text.endswith(
            "assistant\n"
        )
        stream = g.submit(PROMPTS[1], GREEDY)
        answer = stream.read()
        # the same greedy continuation from transformers' own generate, one prompt, no batching
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_folder).eval()
        ids = torch.tensor([g.render(PROMPTS[1])])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=GREEDY.max_new_tokens, do_sample=False,
                                 eos_token_id=g.stop_ids, pad_token_id=g.pad_id, repetition_penalty=1.0)  # fmt: skip
            penalised = model.generate(ids, max_new_tokens=GREEDY.max_new_tokens, do_sample=False,
                                       eos_token_id=g.stop_ids, pad_token_id=g.pad_id)  # fmt: skip
        assert penalised.tolist() != out.tolist()  # the folder's penalty changes the answer...
        new = [t for t in out[0, ids.shape[1] :].tolist() if t not in g.stop_ids]
        assert new, "the tiny Llama answers nothing: the comparison would be empty"
        assert answer == g.tokenizer.decode(new, skip_special_tokens=True).lstrip()  # ...but not the arena's
        sampled = g.submit(PROMPTS[1], Sampling(temperature=1.0, max_new_tokens=4))
        sampled.read()
        assert sampled.finish_reason in ("stop", "length")
        assert stream.tokens == len(new)
    finally:
        g.close()
    glm = BatchingGenerator(tiny_glm_folder, max_wait_s=0.0)
    try:
        assert glm.chat_template_sha256 != g.chat_template_sha256  # each folder's own template
    finally:
        glm.close()


class Breaking:
    """A source that fails after its first piece (a model that crashes mid-answer)."""

    name, checkpoint, chat_template_sha256 = "breaking", None, None

    def stream(self, messages, sampling):
        from glmwb.pretrain.chat_sources import AnswerStream

        out = AnswerStream()
        out.put("Half an ans")
        out.fail("out of memory")
        return out


def test_a_failure_mid_stream_reaches_the_client_as_an_error():
    server = ThreadServer(openai_chat_app({"breaking": Breaking()}), health="/v1/models")
    try:
        stream = OpenAIChatModel("b", f"{server.base_url}/v1", "breaking").stream(PROMPTS[0], GREEDY)
        with pytest.raises(SourceError, match="out of memory"):
            stream.read()
        assert stream.text == "Half an ans"
        whole = httpx.post(
            f"{server.base_url}/v1/chat/completions", json={"model": "breaking", "messages": PROMPTS[0]}
        )
        assert whole.status_code == 503 and "out of memory" in whole.json()["error"]["message"]
    finally:
        server.stop()
