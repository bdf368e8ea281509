"""`glmwb annotate` and `glmwb annotation ...`: the preference store from the command line.

    glmwb annotate --db sqlite:///runs/annotation.db --host 127.0.0.1 --port 7860
    glmwb annotation create-user alice [--role admin]          (password: prompt, --password-env VAR, stdin)
    glmwb annotation set-password alice                        (ends alice's sessions: page and API)
    glmwb annotation add-tasks --db DB --prompts world:train:200 --model runs/q/pretrain/final --k 4
    glmwb annotation add-tasks --db DB --responses answers.jsonl       (pre-generated answers)
    glmwb annotation add-tasks --db DB --world 200 --gold 20           (the embedded world's candidates)
    glmwb annotation import --db DB ../shared/data/hh_rlhf/helpful-base/test.jsonl.gz [--limit N] [--open]
    glmwb annotation export --db DB --out prefs.jsonl|prefs.parquet|DIR [--mode majority|all] [--ties drop]
    glmwb annotation report --db DB [--json]
    glmwb annotation simulate --db DB --annotators sim-0 sim-1 sim-2 [--noise 0.1] [--strength]
    glmwb annotation migrate --db DB

``--db`` defaults to $GLMWB_DB, else sqlite:///runs/annotation.db. Heavy imports happen inside commands.
"""

from __future__ import annotations

import argparse
import functools
import getpass
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

DEFAULT_DB = "sqlite:///runs/annotation.db"


def _user_errors(fn):
    """Turn the store's and readers' refusals into the CLI's one-line user error (exit code 2)."""

    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        from glmwb.annotation.records import PreferenceDataError
        from glmwb.annotation.store import StoreError
        from glmwb.pretrain.errors import ConfigError

        try:
            return fn(args)
        except (StoreError, PreferenceDataError) as e:
            raise ConfigError(str(e)) from None

    return wrapper


def _store(args: argparse.Namespace, **kwargs):
    from glmwb.annotation.store import Store

    return Store(args.db, **kwargs)


def _password(args: argparse.Namespace) -> str:
    from glmwb.pretrain.errors import ConfigError

    if args.password_env:
        if args.password_env not in os.environ:
            raise ConfigError(f"--password-env {args.password_env}: no such environment variable")
        return os.environ[args.password_env]
    if args.password_stdin or not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise ConfigError("the two passwords differ")
    return first


@_user_errors
def cmd_annotate(args: argparse.Namespace) -> int:
    from glmwb.annotation.assign import AssignmentPolicy
    from glmwb.pretrain.errors import ConfigError
    from glmwb.ui.annotator import DEFAULT_GUIDELINES, PageConfig
    from glmwb.ui.app import ServerSettings, serve

    guidelines = Path(args.guidelines).read_text(encoding="utf-8") if args.guidelines else DEFAULT_GUIDELINES
    page = PageConfig(
        guidelines=guidelines,
        guideline_version=args.guideline_version or "",
        attributes=tuple(a for a in args.attributes.split(",") if a),
        export_dir=Path(args.export_dir),
        import_dir=Path(args.import_dir),
    )
    if not args.session_hours > 0:
        raise ConfigError(f"--session-hours must be > 0, got {args.session_hours}")
    store = _store(args, policy=AssignmentPolicy(gold_rate=args.gold_rate, seed=args.seed))
    settings = ServerSettings(
        ui=not args.no_ui,
        page=page,
        session_ttl=timedelta(hours=args.session_hours),
        trusted_origins=tuple(args.origin or ()),
    )
    serve(store, args.host, args.port, settings)
    return 0


@_user_errors
def cmd_migrate(args: argparse.Namespace) -> int:
    store = _store(args)
    print(f"{store.engine.url!r}: schema at the newest revision; rows: {store.counts()}")
    return 0


@_user_errors
def cmd_create_user(args: argparse.Namespace) -> int:
    store = _store(args)
    who = store.create_annotator(args.username, _password(args), role=args.role)
    print(f"created {who.role} {who.username!r} (id {who.id})")
    return 0


@_user_errors
def cmd_set_password(args: argparse.Namespace) -> int:
    store = _store(args)
    store.set_password(args.username, _password(args))
    print(f"new password for {args.username!r}; their sessions (page and API) are ended")
    return 0


@_user_errors
def cmd_add_tasks(args: argparse.Namespace) -> int:
    from glmwb.annotation import tasks

    config = tasks.SamplingConfig(
        k=args.k,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    items = tasks.items_from_sources(
        prompts=args.prompts, models=tuple(args.model or ()), responses=args.responses, world=args.world,
        gold=args.gold, split=args.split, limit=args.limit, sampling=config, per_item=args.per_item,
        items_per_prompt=args.items_per_prompt, overlap=args.overlap, batch=args.batch, seed=args.seed,
    )  # fmt: skip
    store = _store(args)
    ids = store.add_items(items, seed=args.seed)
    gold = sum(i.gold is not None for i in items)
    print(f"added {len(ids)} items ({gold} gold) to {store.engine.url!r}")
    return 0


@_user_errors
def cmd_import(args: argparse.Namespace) -> int:
    """Import a preference file. A malformed row stops the import before anything is written (exit 2, the
    file, row and field named), unless --skip-invalid: then the good rows are imported and every skipped
    row's reason is written to --skipped-report."""
    from glmwb.annotation.export import import_preferences

    store = _store(args)
    result = import_preferences(
        store,
        args.path,
        format=args.format,
        source=args.source,
        limit=args.limit,
        open_for_annotation=args.open,
        overlap=args.overlap,
        skip_invalid=args.skip_invalid,
    )
    print(f"imported {result.items} pairs ({result.already_imported} duplicates left out)")
    for line in result.duplicates[:5]:
        print(f"  duplicate {line}")
    if len(result.duplicates) > 5:
        print(
            f"  ... and {len(result.duplicates) - 5} more (all of them in the report with --duplicates-report)"
        )
    if result.duplicates and args.duplicates_report:
        Path(args.duplicates_report).write_text(
            "".join(f"{line}\n" for line in result.duplicates), encoding="utf-8"
        )
    if result.skipped:
        report = Path(args.skipped_report or f"{Path(args.path).name}.skipped.txt")
        report.write_text("".join(f"{line}\n" for line in result.skipped), encoding="utf-8")
        print(
            f"{len(result.skipped)} invalid rows skipped; every one with its reason in {report}",
            file=sys.stderr,
        )
    return 0


@_user_errors
def cmd_export(args: argparse.Namespace) -> int:
    from glmwb.annotation.export import export_records, write_records

    store = _store(args)
    result = export_records(
        store,
        mode=args.mode,
        ties=args.ties,
        both_bad=args.both_bad,
        include_gold=args.include_gold,
        min_votes=args.min_votes,
    )
    path = write_records(result.rows, args.out)
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(result.skipped.items())) or "none"
    print(f"wrote {len(result.rows)} rows from {result.items} items to {path} (left out: {skipped})")
    return 0


@_user_errors
def cmd_report(args: argparse.Namespace) -> int:
    from glmwb.annotation.agreement import agreement_report

    store = _store(args)
    report = agreement_report(store.votes(), min_common=args.min_common)
    if args.json:
        print(
            json.dumps({"overview": store.overview(), "agreement": report.to_dict()}, indent=1, default=str)
        )
    else:
        o = store.overview()
        print(
            f"{o['items']} items ({o['gold_items']} gold, {o['complete_items']} complete), "
            f"{o['votes']} votes ({o['retracted_votes']} undone)\n"
        )
        print(report.to_markdown())
    return 0


@_user_errors
def cmd_simulate(args: argparse.Namespace) -> int:
    from glmwb.annotation.tasks import simulate_votes

    store = _store(args)
    for name in args.annotators:
        if store.annotator(name) is None:  # a random password: nobody signs in as a simulation
            store.create_annotator(name, os.urandom(16).hex(), role="annotator")
    cast = simulate_votes(
        store, args.annotators, noise=args.noise, seed=args.seed, limit=args.limit, strength=args.strength
    )
    print(f"{len(args.annotators)} simulated annotators cast {cast} votes")
    return 0


def _db(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--db",
        default=os.environ.get("GLMWB_DB", DEFAULT_DB),
        help="SQLAlchemy URL or SQLite file (default $GLMWB_DB or %(default)s)",
    )


def _annotate_parser(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser(
        "annotate",
        help="serve the annotator page and the vote API",
        description="Serve the annotator page (Gradio, sign-in required) and the JSON vote API.",
    )
    _db(a)
    a.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    a.add_argument("--port", type=int, default=7860)
    a.add_argument("--guidelines", help="a Markdown file with the guidelines (default: built in)")
    a.add_argument("--guideline-version", help="recorded with every vote (default: hash of the guidelines)")
    a.add_argument("--attributes", default="correctness,helpfulness,language", help="rated attributes")
    a.add_argument("--gold-rate", type=float, default=0.1, help="share of gold items mixed in")
    a.add_argument("--export-dir", default="runs/annotation_exports")
    a.add_argument(
        "--import-dir",
        default="runs/annotation_imports",
        help="the only folder the Admin tab imports tasks from",
    )
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--no-ui", action="store_true", help="the JSON API only")
    a.add_argument("--session-hours", type=float, default=12.0, help="a page session's life (hours)")
    a.add_argument(
        "--origin",
        action="append",
        help="an address the page is reached at besides its own, e.g. https://annotate.example behind a "
        "proxy (repeatable; browsers' requests from any other origin are refused)",
    )
    a.set_defaults(func=cmd_annotate)


def _store_parsers(nsub: argparse._SubParsersAction) -> None:
    """migrate, create-user, set-password, add-tasks."""
    m = nsub.add_parser("migrate", help="create or upgrade the store's schema")
    _db(m)
    m.set_defaults(func=cmd_migrate)

    u = nsub.add_parser("create-user", help="create an annotator or admin account")
    _db(u)
    u.add_argument("username")
    u.add_argument("--role", choices=("annotator", "admin"), default="annotator")
    u.add_argument("--password-env", help="read the password from this environment variable")
    u.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    u.set_defaults(func=cmd_create_user)

    pw = nsub.add_parser("set-password", help="set an account's password (ends its sessions)")
    _db(pw)
    pw.add_argument("username")
    pw.add_argument("--password-env", help="read the password from this environment variable")
    pw.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    pw.set_defaults(func=cmd_set_password)

    t = nsub.add_parser("add-tasks", help="sample answers and add comparison items")
    _db(t)
    t.add_argument("--prompts", help="world[:split[:n]], a JSONL file or a datasets folder")
    t.add_argument("--model", action="append", help="an HF model folder to sample from (repeatable)")
    t.add_argument("--responses", help="JSONL file or datasets folder with pre-generated answers per prompt")
    t.add_argument("--world", type=int, help="N items from the embedded world's candidate answers")
    t.add_argument("--gold", type=int, default=0, help="with --world: this many gold items too")
    t.add_argument("--split", default="train", help="with --world: train or heldout")
    t.add_argument("--limit", type=int, help="at most this many prompts")
    t.add_argument("--k", type=int, default=2, help="answers sampled per prompt and model")
    t.add_argument("--max-new-tokens", type=int, default=128)
    t.add_argument("--temperature", type=float, default=0.8)
    t.add_argument("--top-p", type=float, default=0.95)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--per-item", type=int, default=2, help="answers per comparison item (2-4)")
    t.add_argument("--items-per-prompt", type=int, default=1, help="items per prompt (0: every group)")
    t.add_argument("--overlap", type=int, default=3, help="distinct annotators per item")
    t.add_argument("--batch", default="", help="a name for this round of items")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_add_tasks)


def _data_parsers(nsub: argparse._SubParsersAction) -> None:
    """import, export, report, simulate."""
    i = nsub.add_parser("import", help="import a public preference set (hh-rlhf, prompt/chosen/rejected)")
    _db(i)
    i.add_argument("path")
    i.add_argument("--format", default="auto", help="auto, preference, hh_rlhf or oasst_zh")
    i.add_argument("--source", help="a name for the data set (default: the file's name)")
    i.add_argument("--limit", type=int)
    i.add_argument("--open", action="store_true", help="also give the items to annotators")
    i.add_argument("--overlap", type=int, default=3)
    i.add_argument(
        "--skip-invalid", action="store_true", help="import the good rows, skip (and report) bad ones"
    )
    i.add_argument(
        "--skipped-report", help="with --skip-invalid: where the skipped rows go (default FILE.skipped.txt)"
    )
    i.add_argument("--duplicates-report", help="write every duplicate pair left out (by id) to this file")
    i.set_defaults(func=cmd_import)

    e = nsub.add_parser("export", help="export votes as prompt / chosen / rejected records")
    _db(e)
    e.add_argument("--out", required=True, help="FILE.jsonl, FILE.parquet, or a folder (datasets)")
    e.add_argument("--mode", choices=("majority", "all"), default="majority")
    e.add_argument("--ties", choices=("keep", "drop"), default="keep")
    e.add_argument("--both-bad", choices=("tie", "drop"), default="tie")
    e.add_argument("--include-gold", action="store_true")
    e.add_argument("--min-votes", type=int, default=1)
    e.set_defaults(func=cmd_export)

    r = nsub.add_parser("report", help="progress and agreement statistics")
    _db(r)
    r.add_argument("--json", action="store_true")
    r.add_argument("--min-common", type=int, default=5, help="items two annotators share for Cohen's kappa")
    r.set_defaults(func=cmd_report)

    s = nsub.add_parser("simulate", help="let simulated annotators vote on world items")
    _db(s)
    s.add_argument("--annotators", nargs="+", default=["sim-0", "sim-1", "sim-2"])
    s.add_argument("--noise", type=float, default=0.1)
    s.add_argument("--limit", type=int)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--strength",
        action="store_true",
        help="winners' votes also say how much better (the export's margin)",
    )
    s.set_defaults(func=cmd_simulate)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `annotate` and `annotation` to the `glmwb` parser."""
    _annotate_parser(sub)
    n = sub.add_parser("annotation", help="manage the preference store", description=__doc__.split("\n")[0])
    nsub = n.add_subparsers(dest="annotation_command", required=True, metavar="COMMAND")
    _store_parsers(nsub)
    _data_parsers(nsub)
