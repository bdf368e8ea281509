"""`glmwb arena serve` and `glmwb arena serve-model`: the comparison app, and a model folder behind an
OpenAI-compatible endpoint.

    glmwb arena serve --db sqlite:///runs/annotation.db \\
        --model sft=runs/quickstart/sft/model --model dpo=runs/quickstart/dpo/model \\
        --endpoint big=http://127.0.0.1:8000/v1#Qwen/Qwen2.5-7B-Instruct --api-key-env OPENAI_API_KEY
    glmwb arena serve-model runs/quickstart/dpo/model --name dpo --port 8000

``--model NAME=FOLDER``: a Hugging Face causal-LM folder loaded in this process (names on one folder share
its one batching generator). ``--endpoint NAME=URL[#MODEL]``: an OpenAI-compatible chat-completions
endpoint (``URL`` ends with ``/v1``; ``MODEL`` is the endpoint's model id, default NAME). Sign-in uses the
store's accounts (``glmwb annotation create-user``). Both bind to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def _specs(values: list[str] | None, flag: str) -> list[tuple[str, str]]:
    from glmwb.pretrain.errors import ConfigError

    out = []
    for value in values or []:
        name, sep, target = value.partition("=")
        if not sep or not name.strip() or not target.strip():
            raise ConfigError(f"{flag} {value!r}: expected NAME=TARGET, e.g. {flag} sft=runs/sft/model")
        out.append((name.strip(), target.strip()))
    return out


def build_models(args: argparse.Namespace) -> dict:
    """The arena's models from ``--model`` / ``--endpoint`` / ``--alias`` (one generator per folder)."""
    from glmwb.pretrain.chat_sources import BatchingGenerator, LocalChatModel, OpenAIChatModel
    from glmwb.pretrain.errors import ConfigError
    from glmwb.ui.arena import ArenaModel

    folders = _specs(args.model, "--model")
    endpoints = _specs(args.endpoint, "--endpoint")
    names = [n for n, _ in folders + endpoints]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"model name {duplicates[0]!r} is given twice; every model needs its own name")
    if len(names) < 2:
        raise ConfigError("an arena needs at least two models (--model NAME=FOLDER, --endpoint NAME=URL)")
    for _, folder in folders:
        if not (Path(folder) / "config.json").is_file():
            raise ConfigError(f"--model {folder}: not a model folder (no config.json)")
    api_key = None
    if args.api_key_env:
        if args.api_key_env not in os.environ:
            raise ConfigError(f"--api-key-env {args.api_key_env}: no such environment variable")
        api_key = os.environ[args.api_key_env]
    aliases = {
        n: tuple(a.strip() for a in v.split(",") if a.strip()) for n, v in _specs(args.alias, "--alias")
    }
    unknown = sorted(set(aliases) - set(names))
    if unknown:
        raise ConfigError(f"--alias {unknown[0]}: no model of that name (models: {', '.join(names)})")
    for name, target in endpoints:  # every check before any model is loaded
        if not target.startswith(("http://", "https://")):
            raise ConfigError(f"--endpoint {name}={target}: the URL must start with http:// or https://")
    generators: dict[Path, BatchingGenerator] = {}
    models = {}
    for name, folder in folders:
        key = Path(folder).resolve()
        if key not in generators:
            generators[key] = BatchingGenerator(key, max_batch=args.max_batch, device=args.device)
        models[name] = ArenaModel(LocalChatModel(name, generators[key]), aliases.get(name, ()))
    for name, target in endpoints:
        url, _, remote = target.partition("#")
        source = OpenAIChatModel(name, url, remote or name, api_key=api_key)
        models[name] = ArenaModel(source, aliases.get(name, ()))
    return models


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from glmwb.annotation.store import Store, StoreError
    from glmwb.pretrain.chat_sources import Sampling
    from glmwb.pretrain.errors import ConfigError
    from glmwb.ui.app import served_settings
    from glmwb.ui.arena import Arena, ArenaConfig, create_arena_app

    if args.per_minute < 1 or args.per_day < 1:
        raise ConfigError("--per-minute and --per-day must be >= 1")
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    models = build_models(args)
    try:
        store = Store(args.db)
    except StoreError as e:
        raise ConfigError(str(e)) from None
    config = ArenaConfig(sampling=sampling, per_minute=args.per_minute, per_day=args.per_day, seed=args.seed)
    app = create_arena_app(store, Arena(store, models, config), served_settings(args.host))
    print(f"arena on http://{args.host}:{args.port}/ with {', '.join(sorted(models))}; store {store.url!r}")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0


def cmd_serve_model(args: argparse.Namespace) -> int:
    import uvicorn

    from glmwb.pretrain.chat_server import openai_chat_app
    from glmwb.pretrain.chat_sources import BatchingGenerator, LocalChatModel
    from glmwb.pretrain.errors import ConfigError

    if not (Path(args.folder) / "config.json").is_file():
        raise ConfigError(f"{args.folder}: not a model folder (no config.json)")
    name = args.name or Path(args.folder).resolve().name
    generator = BatchingGenerator(args.folder, max_batch=args.max_batch, device=args.device)
    app = openai_chat_app({name: LocalChatModel(name, generator)}, default_max_tokens=args.max_new_tokens)
    print(f"OpenAI-compatible chat completions for {name!r} on http://{args.host}:{args.port}/v1")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0


def _common(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=port)
    p.add_argument("--max-batch", type=int, default=8, help="requests a model folder answers in one batch")
    p.add_argument("--device", help="cuda / cpu (default: cuda when there is one)")


def add_serve(asub: argparse._SubParsersAction) -> None:
    p = asub.add_parser(
        "serve",
        help="serve the side-by-side comparison app",
        description="Serve the arena (Gradio, sign-in with the store's accounts); votes go into the store.",
    )
    p.add_argument(
        "--db",
        default=os.environ.get("GLMWB_DB", "sqlite:///runs/annotation.db"),
        help="SQLAlchemy URL or SQLite file (default $GLMWB_DB or %(default)s)",
    )
    p.add_argument("--model", action="append", metavar="NAME=FOLDER", help="a model folder (repeat)")
    p.add_argument(
        "--endpoint", action="append", metavar="NAME=URL[#MODEL]", help="an OpenAI-compatible endpoint"
    )
    p.add_argument("--api-key-env", metavar="VAR", help="environment variable with the endpoints' API key")
    p.add_argument("--alias", action="append", metavar="NAME=A,B", help="other names a model goes by")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--per-minute", type=int, default=10, help="prompts per user per minute")
    p.add_argument("--per-day", type=int, default=300, help="prompts per user per UTC day")
    p.add_argument("--seed", type=int, help="seed of the pair draws (default: random)")
    _common(p, 7861)
    p.set_defaults(func=cmd_serve)

    m = asub.add_parser(
        "serve-model",
        help="serve a model folder as an OpenAI-compatible chat endpoint",
        description="Serve a model folder at /v1/chat/completions (streaming or not) and /v1/models.",
    )
    m.add_argument("folder", help="a Hugging Face causal-LM folder with a chat template")
    m.add_argument("--name", help="the model id it is served as (default: the folder's name)")
    m.add_argument("--max-new-tokens", type=int, default=256, help="default max_tokens")
    _common(m, 8000)
    m.set_defaults(func=cmd_serve_model)
