"""HTTP scoring API (FastAPI) over a ``RewardScorer``, and a client with the same ``score`` method.

    glmwb serve-rewards runs/reward/final --port 8008

    POST /score   {"prompts": ["What is 2 + 3?", [{"role": "user", "content": "..."}]],
                   "responses": ["5", "..."], "head": null, "normalize": false}
              ->  {"scores": [1.7, -0.4], "head": "reward", "truncated": [false, false], "model": "..."}
    POST /score_heads  same body -> {"scores": [{"reward": 1.7, "correctness": 0.9}, ...], ...}
    GET  /health  -> {"status": "ok", "model": ..., "heads": [...], "max_length": ..., "max_batch": ...}

Errors are JSON: 422 when the body does not have the right shape or types (FastAPI's ``detail`` lists each
bad field's location), 400 ``{"detail": {"field": "responses[3]", "error": "empty response"}}`` for a bad
value, 413 when a request holds more than ``max_batch`` items, a text over ``max_chars`` characters or a
prompt over ``max_messages`` messages (the field is named), or a body over ``max_body`` bytes (refused
before it is read).

Every request is bounded (``ScoringLimits``) and goes through ``annotation.guard.RequestGuard``: requests
that another web page made are refused (403), JSON bodies with NaN / Infinity or lone surrogates are 400s.
The scorer cuts any text to what ``max_length`` tokens can hold before tokenizing (``RewardScorer``), so
the largest request costs about as much as ``max_batch`` items of ``max_length`` tokens. With a token
(``GLMWB_REWARD_TOKEN``, or ``--token-env VAR``), ``/score`` and ``/score_heads`` need
``Authorization: Bearer TOKEN``; ``serve`` refuses to listen beyond loopback without one.
"""

# No `from __future__ import annotations` here: FastAPI must see the request models (defined inside
# create_app) as classes, not as strings it cannot resolve.
import argparse
import hmac
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from glmwb.annotation.guard import GuardPolicy, RequestGuard, install_error_handlers, loopback

if TYPE_CHECKING:  # heavy (torch, transformers): imported when serving, not when the CLI starts
    from glmwb.rewards.scoring import RewardScorer

TOKEN_ENV = "GLMWB_REWARD_TOKEN"


@dataclass(frozen=True)
class ScoringLimits:
    max_batch: int = 256  # items per request
    max_chars: int = 100_000  # characters per text (each message's content, each response)
    max_messages: int = 64  # messages per prompt
    max_body: int = 8 * 2**20  # bytes per request body
    trusted_hosts: tuple[str, ...] = ()  # Host names to answer to; empty: any (serve() sets loopback names)


class _TooLarge(Exception):
    def __init__(self, field: str, error: str) -> None:
        self.field, self.error = field, error


def _check(req: Any, limits: ScoringLimits) -> tuple[list[Any], list[str]]:
    """The request's prompts and responses, each within ``limits`` (else ``_TooLarge`` naming the field)."""
    if len(req.prompts) > limits.max_batch:
        raise _TooLarge(
            "prompts", f"{len(req.prompts)} items > max_batch {limits.max_batch}; split the request"
        )
    if len(req.responses) > limits.max_batch:
        raise _TooLarge("responses", f"{len(req.responses)} items > max_batch {limits.max_batch}")

    def bounded(text: str, field: str) -> None:
        if len(text) > limits.max_chars:
            raise _TooLarge(field, f"{len(text):,} characters > max_chars {limits.max_chars:,}")

    for i, p in enumerate(req.prompts):
        if isinstance(p, str):
            bounded(p, f"prompts[{i}]")
            continue
        if len(p) > limits.max_messages:
            raise _TooLarge(f"prompts[{i}]", f"{len(p)} messages > max_messages {limits.max_messages}")
        for j, m in enumerate(p):
            bounded(m.content, f"prompts[{i}][{j}].content")
    for i, r in enumerate(req.responses):
        bounded(r, f"responses[{i}]")
    prompts = [p if isinstance(p, str) else [m.model_dump() for m in p] for p in req.prompts]
    return prompts, list(req.responses)


def create_app(
    scorer: "RewardScorer",
    max_batch: int | None = None,
    limits: ScoringLimits | None = None,
    token: str | None = None,
) -> Any:
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field

    from glmwb.rewards.scoring import ScoringError

    limits = limits or ScoringLimits()
    if max_batch is not None:
        limits = ScoringLimits(**{**limits.__dict__, "max_batch": max_batch})

    class Message(BaseModel):
        model_config = ConfigDict(extra="allow")
        role: str = Field(max_length=32)
        content: str

    class ScoreRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        prompts: list[str | list[Message]] = Field(description="a user turn, or chat messages, per item")
        responses: list[str] = Field(description="the assistant's answer per item")
        head: str | None = Field(default=None, max_length=64)
        normalize: bool = False

    app = FastAPI(title="glm-workbench reward scoring", version="1")
    install_error_handlers(app)
    app.add_middleware(
        RequestGuard, policy=GuardPolicy(max_body=limits.max_body, trusted_hosts=limits.trusted_hosts)
    )

    def signed_in(request: Request) -> None:
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(401, "this scoring server needs Authorization: Bearer TOKEN",
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    @app.exception_handler(ScoringError)
    async def _bad_value(_request, exc: ScoringError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": {"field": exc.field, "error": exc.message}})

    @app.exception_handler(_TooLarge)
    async def _too_large(_request, exc: _TooLarge) -> JSONResponse:
        return JSONResponse(status_code=413, content={"detail": {"field": exc.field, "error": exc.error}})

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": scorer.name,
            "heads": scorer.heads,
            "max_length": scorer.max_length,
            "max_batch": limits.max_batch,
            "max_chars": limits.max_chars,
            "max_body": limits.max_body,
            "token": token is not None,
        }

    @app.post("/score", dependencies=[Depends(signed_in)])
    def score(req: ScoreRequest) -> dict[str, Any]:
        prompts, responses = _check(req, limits)
        scores, truncated = scorer.score_detailed(prompts, responses, head=req.head, normalize=req.normalize)
        head = scorer.heads[scorer.head_index(req.head)]
        return {"scores": scores, "head": head, "truncated": truncated, "model": scorer.name}

    @app.post("/score_heads", dependencies=[Depends(signed_in)])
    def score_heads(req: ScoreRequest) -> dict[str, Any]:
        prompts, responses = _check(req, limits)
        return {"scores": scorer.score_heads(prompts, responses), "heads": scorer.heads, "model": scorer.name}

    return app


class RewardClient:
    """The HTTP API with ``RewardScorer``'s ``score`` signature (PPO can take either)."""

    def __init__(self, url: str, timeout: float = 60.0, client: Any = None, token: str | None = None) -> None:
        import httpx

        self.url = url.rstrip("/")
        self._client = client or httpx.Client(base_url=self.url, timeout=timeout)
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    def score(
        self,
        prompts: Sequence[Any],
        responses: Sequence[str],
        head: str | None = None,
        normalize: bool = False,
    ) -> list[float]:
        body = {"prompts": list(prompts), "responses": list(responses), "head": head, "normalize": normalize}
        r = self._client.post("/score", json=body, headers=self._headers)
        if r.status_code != 200:
            from glmwb.rewards.scoring import ScoringError

            try:
                detail = r.json().get("detail")
            except ValueError:
                detail = r.text[:200]
            if isinstance(detail, dict) and "field" in detail:
                raise ScoringError(detail["field"], detail["error"])
            raise ValueError(f"reward server {self.url}: HTTP {r.status_code}: {detail}")
        return r.json()["scores"]

    def health(self) -> dict[str, Any]:
        return self._client.get("/health").json()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="glmwb serve-rewards", description="Serve a reward folder over HTTP."
    )
    add_arguments(parser)
    return serve(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a reward folder (GlmForSequenceClassification + tokenizer)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8008)
    parser.add_argument("--max-batch", type=int, default=256, help="most items per request")
    parser.add_argument("--max-chars", type=int, default=100_000, help="most characters per text")
    parser.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body, MiB")
    parser.add_argument(
        "--token-env",
        default=TOKEN_ENV,
        help="environment variable holding the bearer token clients must send (default %(default)s; "
        "unset: no token, which only a loopback --host allows)",
    )
    parser.add_argument("--max-length", type=int, default=None, help="tokens per item (default: the model's)")
    parser.add_argument("--truncation", choices=("left", "error"), default="left")
    parser.add_argument("--device", default=None)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from glmwb.pretrain.errors import ConfigError
    from glmwb.rewards.scoring import RewardScorer

    token = os.environ.get(args.token_env) or None
    if token is None and not loopback(args.host):
        raise ConfigError(
            f"--host {args.host} listens beyond this machine: set a token in ${args.token_env} "
            "(clients send it as Authorization: Bearer TOKEN; RewardClient reads $GLMWB_REWARD_TOKEN)"
        )
    for name in ("max_batch", "max_chars", "max_body_mb"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    limits = ScoringLimits(
        max_batch=args.max_batch,
        max_chars=args.max_chars,
        max_body=int(args.max_body_mb * 2**20),
        trusted_hosts=("127.0.0.1", "localhost", "[::1]") if loopback(args.host) else (),
    )
    scorer = RewardScorer.from_pretrained(
        args.model, device=args.device, max_length=args.max_length, truncation=args.truncation
    )
    print(
        f"serving {args.model} (heads {scorer.heads}, max_length {scorer.max_length}) on http://{args.host}:{args.port}"
    )
    uvicorn.run(
        create_app(scorer, limits=limits, token=token), host=args.host, port=args.port, log_level="info"
    )
    return 0
