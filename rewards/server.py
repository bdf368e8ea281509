"""HTTP scoring API (FastAPI) over a ``RewardScorer``, and a client with the same ``score`` method.

    glmwb serve-rewards runs/reward/final --port 8008

    POST /score   {"prompts": ["What is 2 + 3?", [{"role": "user", "content": "..."}]],
                   "responses": ["5", "..."], "head": null, "normalize": false}
              ->  {"scores": [1.7, -0.4], "head": "reward", "truncated": [false, false], "model": "..."}
    POST /score_heads  same body -> {"scores": [{"reward": 1.7, "correctness": 0.9}, ...], ...}
    GET  /health  -> {"status": "ok", "model": ..., "heads": [...], "max_length": ..., "max_batch": ...}

Errors are JSON: 422 when the body does not have the right shape or types (FastAPI's ``detail`` lists each
bad field's location), 400 ``{"detail": {"field": "responses[3]", "error": "empty response"}}`` for a bad
value, 413 when a request holds more than ``max_batch`` items.
"""

# No `from __future__ import annotations` here: FastAPI must see the request models (defined inside
# create_app) as classes, not as strings it cannot resolve.
import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy (torch, transformers): imported when serving, not when the CLI starts
    from glmwb.rewards.scoring import RewardScorer


def create_app(scorer: "RewardScorer", max_batch: int = 256) -> Any:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field

    from glmwb.rewards.scoring import ScoringError

    class Message(BaseModel):
        model_config = ConfigDict(extra="allow")
        role: str
        content: str

    class ScoreRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        prompts: list[str | list[Message]] = Field(description="a user turn, or chat messages, per item")
        responses: list[str] = Field(description="the assistant's answer per item")
        head: str | None = None
        normalize: bool = False

    app = FastAPI(title="glm-workbench reward scoring", version="1")

    @app.exception_handler(ScoringError)
    async def _bad_value(_request, exc: ScoringError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": {"field": exc.field, "error": exc.message}})

    def _check(req: ScoreRequest) -> tuple[list[Any], list[str]]:
        if len(req.prompts) > max_batch:
            raise _TooMany(len(req.prompts), max_batch)
        prompts = [p if isinstance(p, str) else [m.model_dump() for m in p] for p in req.prompts]
        return prompts, list(req.responses)

    @app.exception_handler(_TooMany)
    async def _too_many(_request, exc: _TooMany) -> JSONResponse:
        return JSONResponse(
            status_code=413,
            content={
                "detail": {
                    "field": "prompts",
                    "error": f"{exc.n} items > max_batch {exc.limit}; split the request",
                }
            },
        )

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": scorer.name,
            "heads": scorer.heads,
            "max_length": scorer.max_length,
            "max_batch": max_batch,
        }

    @app.post("/score")
    def score(req: ScoreRequest) -> dict[str, Any]:
        prompts, responses = _check(req)
        scores, truncated = scorer.score_detailed(prompts, responses, head=req.head, normalize=req.normalize)
        head = scorer.heads[scorer.head_index(req.head)]
        return {"scores": scores, "head": head, "truncated": truncated, "model": scorer.name}

    @app.post("/score_heads")
    def score_heads(req: ScoreRequest) -> dict[str, Any]:
        prompts, responses = _check(req)
        return {"scores": scorer.score_heads(prompts, responses), "heads": scorer.heads, "model": scorer.name}

    return app


class _TooMany(Exception):
    def __init__(self, n: int, limit: int) -> None:
        self.n, self.limit = n, limit


class RewardClient:
    """The HTTP API with ``RewardScorer``'s ``score`` signature (PPO can take either)."""

    def __init__(self, url: str, timeout: float = 60.0, client: Any = None) -> None:
        import httpx

        self.url = url.rstrip("/")
        self._client = client or httpx.Client(base_url=self.url, timeout=timeout)

    def score(
        self,
        prompts: Sequence[Any],
        responses: Sequence[str],
        head: str | None = None,
        normalize: bool = False,
    ) -> list[float]:
        body = {"prompts": list(prompts), "responses": list(responses), "head": head, "normalize": normalize}
        r = self._client.post("/score", json=body)
        if r.status_code != 200:
            from glmwb.rewards.scoring import ScoringError

            detail = r.json().get("detail")
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
    parser.add_argument("--max-length", type=int, default=None, help="tokens per item (default: the model's)")
    parser.add_argument("--truncation", choices=("left", "error"), default="left")
    parser.add_argument("--device", default=None)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from glmwb.rewards.scoring import RewardScorer

    scorer = RewardScorer.from_pretrained(
        args.model, device=args.device, max_length=args.max_length, truncation=args.truncation
    )
    print(
        f"serving {args.model} (heads {scorer.heads}, max_length {scorer.max_length}) on http://{args.host}:{args.port}"
    )
    uvicorn.run(
        create_app(scorer, max_batch=args.max_batch), host=args.host, port=args.port, log_level="info"
    )
    return 0
