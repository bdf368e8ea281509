"""`glmwb arena ...`: the side-by-side comparison app and its leaderboard.

    glmwb arena serve --db URL --model NAME=FOLDER ... [--endpoint NAME=URL[#MODEL] ...]   (the app)
    glmwb arena serve-model FOLDER [--name NAME] [--port 8000]      (an OpenAI-compatible endpoint)
    glmwb arena leaderboard --db URL | --votes FILE [--style-control] [--json OUT] [--plot OUT.png]
        [--ties davidson|rao-kupper|none] [--bothbad separate|tie|drop] [--bootstrap 1000]
        [--category C] [--arena-only] [--fragility] [--seed 0]

``--votes`` reads FastChat's public battle format (JSONL or a JSON list: ``model_a``, ``model_b``,
``winner``, optional ``conv_metadata`` token counts); ``--db`` reads the annotation store's two-answer
comparison votes. Bad input prints one line and exits with code 2. Each subcommand is added by one
function in ``SUBCOMMANDS`` (``add_leaderboard`` here; the app adds its own).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from glmwb.recipes.arena_serve_cli import add_serve


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from glmwb.annotation.ratings import (
        RatingsError,
        adjacent_separations,
        battles_from_store,
        fit_bt,
        plot_leaderboard,
        rank_fragility,
        ratings_json,
        read_battles,
    )
    from glmwb.annotation.store import StoreError
    from glmwb.pretrain.errors import ConfigError

    if (args.db is None) == (args.votes is None):
        raise ConfigError("give one of --db URL or --votes FILE")
    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    try:
        if args.votes is not None:
            if not Path(args.votes).is_file():
                raise ConfigError(f"--votes {args.votes}: no such file")
            battles = read_battles(args.votes)
        else:
            from sqlalchemy.exc import SQLAlchemyError

            from glmwb.annotation.store import Store

            try:
                with Store(args.db) as store:
                    battles = battles_from_store(store, arena_only=args.arena_only)
            except SQLAlchemyError as e:
                first = str(e.orig if getattr(e, "orig", None) is not None else e).splitlines()[0]
                raise ConfigError(f"--db {args.db}: cannot read the store ({first})") from None
        lb = fit_bt(
            battles,
            ties=args.ties,
            bothbad=args.bothbad,
            style_control=args.style_control,
            bootstrap=args.bootstrap,
            category=args.category,
            seed=args.seed,
        )
        if args.fragility:
            rank_fragility(battles, lb)
    except (RatingsError, StoreError) as e:
        raise ConfigError(str(e)) from None
    print(lb.table())
    seps = [s for s in adjacent_separations(lb) if s.votes]
    if seps:
        print("\nbattles still needed to separate neighbours (at the estimated gap):")
        for s in seps:
            print(f"  {s.model_a} vs {s.model_b}: gap {s.gap:+.0f}, about {s.votes} more")
    if args.json:
        print(f"json → {ratings_json(lb, args.json)}")
    if args.plot:
        print(f"plot → {plot_leaderboard(lb, battles, args.plot)}")
    return 0


def add_leaderboard(asub: argparse._SubParsersAction) -> None:
    p = asub.add_parser(
        "leaderboard",
        help="rate models from arena votes (store or FastChat battle file)",
        description="Bradley-Terry ratings with ties, intervals and ranks from battles.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--db", help="the annotation store's URL (or an SQLite path)")
    src.add_argument("--votes", help="battles in FastChat's format (JSONL or a JSON list)")
    p.add_argument("--style-control", action="store_true", help="length and markdown covariates")
    p.add_argument("--json", metavar="OUT", help="write the leaderboard as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="plot ratings and the win-rate matrix")
    p.add_argument("--ties", choices=("davidson", "rao-kupper", "none"), default="davidson")
    p.add_argument("--bothbad", choices=("separate", "tie", "drop"), default="separate")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap rounds (0: robust intervals only)")
    p.add_argument("--category", help="only battles of this prompt category")
    p.add_argument("--arena-only", action="store_true", help="--db: only the arena's votes")
    p.add_argument("--fragility", action="store_true", help="also the fewest votes that change each rank")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_leaderboard)


# Each adds one subcommand to `glmwb arena` (the app's: recipes/arena_serve_cli.py).
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_leaderboard, add_serve]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `arena` command group to the `glmwb` parser."""
    a = sub.add_parser(
        "arena", help="the side-by-side comparison app and leaderboard", description=__doc__.split("\n")[0]
    )
    asub = a.add_subparsers(dest="arena_command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(asub)


if __name__ == "__main__":
    from glmwb.recipes.cli import main

    sys.exit(main(["arena", *sys.argv[1:]]))
