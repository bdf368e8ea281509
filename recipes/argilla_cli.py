"""`glmwb argilla push | pull | status` and `glmwb argilla-server` (docs/argilla.md).

    glmwb argilla-server [--home runs/argilla] [--port 6900]        a local Argilla (no Elasticsearch)
    glmwb argilla push --db DB --dataset prefs [--reward-model runs/q/reward/final] [--overlap N]
    glmwb argilla pull --db DB --dataset prefs                       submitted responses -> votes
    glmwb argilla status --db DB --dataset prefs

The server is ``--url`` (default $ARGILLA_API_URL, else http://127.0.0.1:6900) and the API key is read from
the environment variable ``--api-key-env`` names (default ARGILLA_API_KEY), never from the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

from glmwb.recipes.annotation_cli import DEFAULT_DB, _user_errors


def _client(args: argparse.Namespace):
    from glmwb.annotation.argilla import ArgillaError, connect

    key = os.environ.get(args.api_key_env, "")
    if not key:
        raise ArgillaError(
            f"no API key: set the environment variable {args.api_key_env} (or pass --api-key-env)"
        )
    return connect(args.url, key)


def _suggestions(args: argparse.Namespace, store) -> dict:
    """The reward model's rewards for answers A and B of every two-answer item (the push's suggestions)."""
    if not args.reward_model:
        return {}
    from glmwb.annotation.argilla import RMSuggestion
    from glmwb.rewards.scoring import RewardScorer

    scorer = RewardScorer.from_pretrained(args.reward_model, device="cpu")
    items = [i for i in store.items().values() if len(i.responses) == 2]
    prompts = [i.prompt for i in items for _ in range(2)]
    answers = [r.text for i in items for r in i.responses]
    rewards = scorer.score(prompts, answers) if items else []
    agent = args.agent or scorer.name
    return {
        item.item_id: RMSuggestion(rewards[2 * n], rewards[2 * n + 1], agent) for n, item in enumerate(items)
    }


@_user_errors
def cmd_push(args: argparse.Namespace) -> int:
    from glmwb.annotation.argilla import DEFAULT_GUIDELINES, push
    from glmwb.annotation.store import Store
    from glmwb.pretrain.errors import ConfigError

    if args.overlap < 0:
        raise ConfigError(f"--overlap must be >= 1 (or 0: the items' own overlap), got {args.overlap}")
    client = _client(args)
    guidelines = Path(args.guidelines).read_text() if args.guidelines else DEFAULT_GUIDELINES
    with Store(args.db) as store:
        suggestions = _suggestions(args, store)
        result = push(
            client, store, args.dataset, args.workspace, overlap=args.overlap or None,
            attributes=[a for a in args.attributes.split(",") if a], guidelines=guidelines,
            suggestions=suggestions,
        )  # fmt: skip
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(result.skipped.items())) or "none"
    print(
        f"pushed {result.pushed} items to {args.workspace}/{args.dataset} at {args.url}; skipped: {skipped}"
    )
    print(
        f"suggestions: {len(suggestions)}"
        + (f" (agent {next(iter(suggestions.values())).agent})" if suggestions else "")
    )
    return 0


@_user_errors
def cmd_pull(args: argparse.Namespace) -> int:
    from glmwb.annotation.argilla import pull
    from glmwb.annotation.store import Store

    client = _client(args)
    with Store(args.db) as store:
        r = pull(client, store, args.dataset, args.workspace)
    print(
        f"submitted responses: {r.submitted}; new votes {r.created}, changed {r.updated}, "
        f"unchanged {r.unchanged}, withdrawn {r.withdrawn}; skipped {dict(r.skipped) or 'none'}"
    )
    return 0


@_user_errors
def cmd_status(args: argparse.Namespace) -> int:
    from glmwb.annotation.argilla import status
    from glmwb.annotation.store import Store

    client = _client(args)
    with Store(args.db) as store:
        print(json.dumps(status(client, store, args.dataset, args.workspace), indent=2, default=str))
    return 0


@_user_errors
def cmd_server(args: argparse.Namespace) -> int:
    from glmwb.annotation.argilla_local import ensure_venv, start

    print(f"argilla-server's environment: {ensure_venv(Path(args.venv), quiet=False).parent.parent}")
    key = os.environ.get(args.api_key_env) or None
    server = start(
        Path(args.home), port=args.port, venv=Path(args.venv), database_url=args.database_url, api_key=key
    )
    print(
        f"Argilla at {server.url} (owner {server.username!r}, password {server.password!r}); data in {server.home}"
    )
    print(f"API key: export {args.api_key_env}={server.api_key}")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while all(p.poll() is None for p in server.processes):
            time.sleep(1)
        print("glmwb: argilla-server or redis-server exited; see", server.home / "server.log")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


def _connection(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--db", default=os.environ.get("GLMWB_DB", DEFAULT_DB), help="the store (default $GLMWB_DB)"
    )
    p.add_argument("--url", default=os.environ.get("ARGILLA_API_URL", "http://127.0.0.1:6900"))
    p.add_argument("--api-key-env", default="ARGILLA_API_KEY", help="the variable holding the API key")
    p.add_argument("--dataset", required=True, help="the Argilla dataset's name")
    p.add_argument("--workspace", default="argilla")


def register(sub: argparse._SubParsersAction) -> None:
    """Add `argilla` and `argilla-server` to the `glmwb` parser."""
    a = sub.add_parser(
        "argilla", help="push items to Argilla, pull responses back", description=__doc__.split("\n")[0]
    )
    asub = a.add_subparsers(dest="argilla_command", required=True, metavar="COMMAND")
    p = asub.add_parser("push", help="push the store's comparison items (with RM suggestions)")
    _connection(p)
    p.add_argument("--overlap", type=int, default=0, help="min_submitted (0: the items' overlap)")
    p.add_argument("--attributes", default="correctness,helpfulness,language", help="rated attributes")
    p.add_argument("--guidelines", default=None, help="a Markdown file of guidelines (default: built in)")
    p.add_argument("--reward-model", default=None, help="a reward folder: its preference as suggestions")
    p.add_argument("--agent", default=None, help="the suggestions' agent name (default: the reward folder)")
    p.set_defaults(func=cmd_push)
    p = asub.add_parser("pull", help="submitted responses -> the store's votes (idempotent)")
    _connection(p)
    p.set_defaults(func=cmd_pull)
    p = asub.add_parser("status", help="the dataset's progress and what the store holds from it")
    _connection(p)
    p.set_defaults(func=cmd_status)
    s = sub.add_parser("argilla-server", help="run a local Argilla server (SQLite + Redis, no Elasticsearch)")
    s.add_argument("--home", default="runs/argilla", help="the server's data folder")
    s.add_argument("--port", type=int, default=6900)
    s.add_argument("--venv", default=".venv-argilla-server", help="argilla-server's own environment")
    s.add_argument("--database-url", default=None, help="PostgreSQL instead of SQLite (postgresql://...)")
    s.add_argument(
        "--api-key-env", default="ARGILLA_API_KEY", help="the owner's API key, if set (else made up)"
    )
    s.set_defaults(func=cmd_server)
