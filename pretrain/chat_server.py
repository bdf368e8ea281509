"""A small OpenAI-compatible chat-completions server over our chat sources (``pretrain/chat_sources``).

    POST /v1/chat/completions   {model, messages, stream?, temperature?, top_p?, max_tokens?}
                                stream: server-sent events of ``chat.completion.chunk`` objects, then
                                ``data: [DONE]``; else one ``chat.completion`` object
    GET  /v1/models             the served names

It speaks the subset of the protocol that vLLM and SGLang speak too, so the arena's ``OpenAIChatModel``
is tested against a model of ours served here, and a team can put a local folder behind the same
interface as its remote models. Errors are OpenAI's shape, ``{"error": {"message", "type"}}``, with 4xx.
Binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from glmwb.pretrain.chat_sources import ChatSource, Sampling, SourceError
from glmwb.pretrain.errors import ConfigError


class Message(BaseModel):
    role: str = Field(pattern="^(system|user|assistant|tool|observation)$")
    content: str = Field(max_length=100_000)


class ChatRequest(BaseModel):
    model: str
    messages: list[Message] = Field(min_length=1, max_length=200)
    stream: bool = False
    temperature: float = Field(default=1.0, ge=0.0, le=5.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=32768)
    stream_options: dict | None = None  # {"include_usage": true}: a last chunk with the token counts


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def openai_chat_app(
    sources: Mapping[str, ChatSource], default_max_tokens: int = 256, chunk_delay_s: float = 0.0
) -> FastAPI:
    """The app; ``chunk_delay_s`` paces the stream (a slow network or model, for tests of the client)."""
    app = FastAPI(title="glm-workbench chat", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:])
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}")

    @app.get("/v1/models")
    def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "owned_by": "glmwb"} for n in sources],
        }

    @app.post("/v1/chat/completions")
    def complete(body: ChatRequest):
        source = sources.get(body.model)
        if source is None:
            return _error(404, f"no model {body.model!r}; served: {', '.join(sources)}", "not_found_error")
        try:
            sampling = Sampling(
                temperature=body.temperature,
                top_p=body.top_p,
                max_new_tokens=body.max_completion_tokens or body.max_tokens or default_max_tokens,
            )
        except ConfigError as e:
            return _error(400, str(e))
        messages = [m.model_dump() for m in body.messages]
        if messages[-1]["role"] == "assistant":
            return _error(400, "messages: the last message must not be the assistant's")
        answer = source.stream(messages, sampling)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(delta: dict, finish: str | None = None) -> str:
            body_ = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": source.name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return f"data: {json.dumps(body_, ensure_ascii=False)}\n\n"

        def events() -> Iterator[str]:
            yield chunk({"role": "assistant", "content": ""})
            try:
                for piece in answer:
                    if chunk_delay_s:
                        time.sleep(chunk_delay_s)
                    yield chunk({"content": piece})
            except SourceError as e:
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
                return
            yield chunk({}, answer.finish_reason or "stop")
            if (body.stream_options or {}).get("include_usage"):
                usage = {"completion_tokens": answer.tokens}
                yield f"data: {json.dumps({'id': cid, 'object': 'chat.completion.chunk', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        if body.stream:
            return StreamingResponse(events(), media_type="text/event-stream")
        try:
            text = answer.read()
        except SourceError as e:
            return _error(503, str(e), "server_error")
        return {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": source.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": answer.finish_reason,
                }
            ],
            "usage": {"completion_tokens": answer.tokens},
        }

    return app
