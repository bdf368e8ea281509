"""`glmwb` — the workbench's command line.

    glmwb run RECIPE.yaml [section.key=value ...]     run a stage (or a pipeline of stages)
    glmwb validate RECIPE.yaml [section.key=value ...] check a recipe and print it resolved
    glmwb compare-methods [RECIPE.yaml] [key=value ...] alignment methods from one SFT policy, equal budgets
    glmwb world --out DIR                             write the embedded world's corpus and prompts
    glmwb eval --task gsm8k,... (--model [NAME=]DIR | --predictions [NAME=]FILE) ...   benchmark scores
    glmwb sample MODEL_DIR "prompt" ...               chat with a trained GLM folder
    glmwb serve-rewards REWARD_DIR [--port 8008]       serve a reward model over HTTP (FastAPI)
    glmwb annotate --db URL [--host --port]           serve the annotator page and vote API
    glmwb annotation COMMAND ...                      the preference store (see recipes/annotation_cli.py)
    glmwb arena serve --db URL --model NAME=DIR ...   the side-by-side comparison app (recipes/arena_serve_cli.py)
    glmwb arena leaderboard --db URL | --votes FILE   rate models from arena votes (recipes/arena_cli.py)
    glmwb argilla push | pull | status --db URL ...   Argilla as the labeling front end (recipes/argilla_cli.py)
    glmwb argilla-server [--home DIR --port N]        a local Argilla server, no Elasticsearch (docs/argilla.md)

User mistakes (bad recipe, missing file, bad override) print one clear line and exit with code 2.
"""

from __future__ import annotations

import argparse
import os
import string
import sys
import time
from pathlib import Path
from typing import Any

from glmwb.pretrain.errors import ConfigError
from glmwb.pretrain.run_folder import CheckpointError
from glmwb.recipes.loader import (
    RecipeError,
    apply_override,
    build,
    dump_yaml,
    parse_override,
    read_yaml,
    to_plain,
)

USER_ERROR = 2


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Read, override and strictly build a recipe; raises RecipeError on any user mistake."""
    from glmwb.recipes.schema import stage_class, stage_names

    data = read_yaml(path)
    for text in overrides:
        apply_override(data, *parse_override(text))
    stage = data.get("stage")
    if stage not in stage_names():
        raise RecipeError(f"{path}: 'stage' must be one of {', '.join(stage_names())}, got {stage!r}")
    return build(stage_class(stage), data, source=str(path))


def _stage_overrides(recipe, overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Split CLI overrides of a pipeline: `NAME.key=value` goes to the stage called NAME."""
    names = {s.name for s in recipe.stages} if recipe.stage == "pipeline" else set()
    own, per_stage = [], {n: [] for n in names}
    for text in overrides:
        head = text.split(".", 1)[0]
        if head in names and "=" in text:
            per_stage[head].append(text.split(".", 1)[1])
        else:
            own.append(text)
    return own, per_stage


def resolve_pipeline(path: str | Path, overrides: list[str]) -> tuple[Any, list[tuple[str, Path, Any]]]:
    """Load a pipeline recipe and every stage it names (all validated before anything runs)."""
    top = load_recipe(path, [])
    own, per_stage = _stage_overrides(top, list(overrides))
    pipeline = load_recipe(path, own)
    values = {"run.dir": pipeline.run.dir, "run.seed": str(pipeline.run.seed)}
    stages = []
    for ref in pipeline.stages:
        stage_path = (Path(path).parent / ref.recipe).resolve()
        texts = []
        for key, value in ref.overrides.items():
            if isinstance(value, str):
                try:
                    value = string.Template(_normalise_template(value)).substitute(
                        {k.replace(".", "_"): v for k, v in values.items()}
                    )
                except (KeyError, ValueError) as e:
                    raise RecipeError(
                        f"{path}: stage {ref.name!r}, override {key}: unknown variable {e}"
                    ) from None
                texts.append(f"{key}={value}")
            elif value is None:  # a stage may set a key back to null (the override parser reads YAML)
                texts.append(f"{key}=null")
            else:
                texts.append(f"{key}={value!r}" if not isinstance(value, (list, dict)) else f"{key}={value}")
        texts += per_stage.get(ref.name, [])
        try:
            stages.append((ref.name, stage_path, load_recipe(stage_path, texts)))
        except ConfigError as e:
            raise RecipeError(f"{path}: stage {ref.name!r}: {e}") from None
    return pipeline, stages


def _normalise_template(text: str) -> str:
    # `${run.dir}` → `${run_dir}` so that string.Template can substitute dotted names
    return text.replace("${run.dir}", "${run_dir}").replace("${run.seed}", "${run_seed}")


# Keys that may change between a stopped run and its resumption (budgets, logging, evaluation, threads);
# any other difference means the checkpoints belong to another experiment.
RESUMABLE_CHANGES = (
    "train.max_steps", "train.steps", "train.max_minutes", "train.epochs", "train.eval_every",
    "train.log_every", "train.save_every", "train.keep_checkpoints", "train.num_threads", "train.sample_every",
    "train.samples_shown", "train.eval_batches", "train.resume", "eval.",
)  # fmt: skip


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def resume_conflicts(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Recipe keys whose values differ between the run that wrote the checkpoints and this one, leaving out
    ``RESUMABLE_CHANGES``: "key: old -> new"."""
    a, b = _flat(old), _flat(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_CHANGES):
            continue
        if a.get(key) != b.get(key):
            out.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return out


def _check_resume(recipe: Any) -> None:
    """A run folder with checkpoints is resumed by the stages (``train.resume``); refuse when the recipe that
    wrote them differs from this one, instead of silently mixing two experiments."""
    run_dir = Path(recipe.run.dir)
    train = getattr(recipe, "train", None)
    if train is None or not hasattr(train, "resume") or not any((run_dir / "checkpoints").glob("step_*")):
        return
    if not train.resume:  # starting over: set the old checkpoints aside (never resumed by mistake, not lost)
        import time

        aside = run_dir / f"checkpoints.before-{time.strftime('%Y%m%d-%H%M%S')}"
        (run_dir / "checkpoints").rename(aside)
        print(f"train.resume=false: the previous checkpoints moved to {aside}")
        return
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    conflicts = resume_conflicts(read_yaml(saved), to_plain(recipe))
    if conflicts:
        shown = "; ".join(conflicts[:4]) + (f"; and {len(conflicts) - 4} more" if len(conflicts) > 4 else "")
        raise RecipeError(
            f"{run_dir} has checkpoints of a run with another recipe ({shown}); resuming would mix the two. "
            "Use a new run.dir, or train.resume=false to start this one over"
        )


def run_stage(recipe: Any) -> dict:
    from glmwb.recipes.schema import RUNNERS, stage_runner

    _check_resume(recipe)
    dump_yaml(recipe, Path(recipe.run.dir) / "config.yaml")
    if recipe.stage not in RUNNERS:
        raise RecipeError(f"no runner for stage {recipe.stage!r}")
    return stage_runner(recipe.stage)(recipe)


def is_pipeline(path: str | Path) -> bool:
    return read_yaml(path).get("stage") == "pipeline"


def select_stages(stages: list, only: str | None, start: str | None) -> list:
    """The stages to run: ``only`` (comma-separated names) or every stage from ``start`` on (the earlier
    stages' outputs must already be in the run folder)."""
    names = [name for name, _, _ in stages]
    if only and start:
        raise RecipeError("give --only or --from, not both")
    if only:
        wanted = [n.strip() for n in only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise RecipeError(f"--only: no stage named {', '.join(unknown)}; stages: {', '.join(names)}")
        return [s for s in stages if s[0] in wanted]
    if start:
        if start not in names:
            raise RecipeError(f"--from: no stage named {start!r}; stages: {', '.join(names)}")
        return stages[names.index(start) :]
    return stages


def stage_line(stage: str, summary: dict[str, Any] | None) -> str:
    """What a stage's training came to, from its summary: its budget record's line ("600 of 600 steps", or
    "stopped early at step 418 of 600 (train.max_minutes=30 reached)"), or what the stage did instead."""
    summary = summary or {}
    if summary.get("budget"):
        return summary["budget"]["line"]
    if stage == "align_eval" and "reports" in summary:
        early = summary.get("stopped_early") or []
        note = f"; cut short in training: {', '.join(early)}" if early else ""
        return f"{len(summary['reports'])} policies evaluated{note}"
    if stage == "arena" and "battles" in summary:
        rows = summary.get("leaderboard", {}).get("rows") or [{}]
        return f"{summary['battles']} battles among {len(summary.get('policies', []))} policies; first: {rows[0].get('model')}"
    if stage == "eval" and "runs" in summary:
        tasks = ", ".join(summary["runs"][0]["tasks"])
        return f"{len(summary['runs'])} checkpoints scored on {tasks} (table.md)"
    return "no training steps"


def _pipeline_record(path, pipeline, rows: list[dict[str, Any]], seconds: float, finished: bool) -> Path:
    from glmwb.pretrain.run_folder import write_json

    early = [r["name"] for r in rows if (r["budget"] or {}).get("stopped_early")]
    record = {"recipe": str(path), "run_dir": pipeline.run.dir, "finished": finished,
              "seconds": round(seconds, 1), "stages": rows, "stopped_early": early}  # fmt: skip
    return write_json(Path(pipeline.run.dir) / "summary.json", record)


def _print_pipeline_end(pipeline, rows: list[dict[str, Any]], seconds: float, record: Path) -> None:
    print(f"\npipeline finished in {seconds:.0f} s; outputs under {pipeline.run.dir}")
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"  {r['name']:<{width}}  {r['seconds']:>6.0f} s  {r['line']}")
    early = [r["name"] for r in rows if (r["budget"] or {}).get("stopped_early")]
    if early:
        print(f"note: stopped early: {', '.join(early)}; the models these stages wrote, and the figures of "
              "the stages built on them, are not the ones the recipes describe")  # fmt: skip
    print(f"summary → {record}")


def cmd_dry_run(args: argparse.Namespace) -> int:
    from glmwb.pretrain.dry_run import dry_run

    recipe = None if is_pipeline(args.recipe) else load_recipe(args.recipe, args.overrides)
    if recipe is None or recipe.stage != "pretrain":
        raise RecipeError(f"{args.recipe}: --dry-run estimates pretrain recipes (stage: pretrain) only")
    gpus = args.gpus or int(os.environ.get("WORLD_SIZE", 8))
    if gpus < 1 or not 0 < args.mfu <= 1 or args.gpu_memory <= 0:
        raise RecipeError("--dry-run: --gpus must be >= 1, --mfu in (0, 1], --gpu-memory > 0")
    dry_run(recipe, gpus, args.gpu, args.gpu_memory, args.mfu)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    if getattr(args, "dry_run", False):
        return cmd_dry_run(args)
    if not is_pipeline(args.recipe):
        if getattr(args, "only", None) or getattr(args, "start", None):
            raise RecipeError(f"{args.recipe}: --only / --from apply to pipeline recipes, this is one stage")
        run_stage(load_recipe(args.recipe, args.overrides))
        return 0
    pipeline, stages = resolve_pipeline(args.recipe, args.overrides)
    stages = select_stages(stages, getattr(args, "only", None), getattr(args, "start", None))
    dump_yaml(pipeline, Path(pipeline.run.dir) / "config.yaml")
    started = time.time()
    rows: list[dict[str, Any]] = []
    for i, (name, path, stage) in enumerate(stages, 1):
        print(f"\n=== [{i}/{len(stages)}] {name}: {path.name} → {stage.run.dir} ===", flush=True)
        t0 = time.time()
        summary = run_stage(stage)
        line = stage_line(stage.stage, summary)
        rows.append({"name": name, "stage": stage.stage, "run_dir": stage.run.dir,
                     "seconds": round(time.time() - t0, 1), "budget": (summary or {}).get("budget"),
                     "line": line})  # fmt: skip
        _pipeline_record(args.recipe, pipeline, rows, time.time() - started, finished=False)
        print(f"=== {name} done in {time.time() - t0:.0f} s: {line} ===", flush=True)
    record = _pipeline_record(args.recipe, pipeline, rows, time.time() - started, finished=True)
    _print_pipeline_end(pipeline, rows, time.time() - started, record)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    import yaml

    from glmwb.recipes.loader import to_plain

    if is_pipeline(args.recipe):
        pipeline, stages = resolve_pipeline(args.recipe, args.overrides)
        print(yaml.safe_dump(to_plain(pipeline), sort_keys=False, allow_unicode=True))
        for name, _, stage in stages:
            print(f"# --- stage {name} ---")
            print(yaml.safe_dump(to_plain(stage), sort_keys=False, allow_unicode=True))
        stage_name = "pipeline"
    else:
        recipe = load_recipe(args.recipe, args.overrides)
        print(yaml.safe_dump(to_plain(recipe), sort_keys=False, allow_unicode=True))
        stage_name = recipe.stage
    print(f"OK: {args.recipe} is a valid {stage_name} recipe", file=sys.stderr)
    return 0


def cmd_world(args: argparse.Namespace) -> int:
    from glmwb.pretrain.world.cli import main as world_main

    return world_main(["--out", args.out, "--seed", str(args.seed)]) or 0


def cmd_sample(args: argparse.Namespace) -> int:
    from glmwb.pretrain.generate import generate
    from glmwb.pretrain.hf import load_pretrained
    from glmwb.pretrain.run import load_tokenizer
    from glmwb.pretrain.tokenizer import render_chat, turn_terminator_ids

    if not (Path(args.model) / "config.json").is_file():
        raise RecipeError(f"no model folder at {args.model!r} (expected config.json there)")
    tok = load_tokenizer(args.model)
    model = load_pretrained(args.model)
    for prompt in args.prompts:
        text = render_chat(tok, [{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out = generate(
            model,
            [ids],
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            stop_token_ids=turn_terminator_ids(tok),
            pad_token_id=tok.pad_token_id,
        )
        print(f"> {prompt}\n{tok.decode(out[0], skip_special_tokens=True).strip()}\n")
    return 0


def _named(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    return (name, path) if sep else (Path(text.rstrip("/")).name or text, text)


def cmd_eval(args: argparse.Namespace) -> int:
    """`glmwb eval`: the options become an `eval` stage recipe, built (and range-checked) by the loader."""
    from glmwb.align.evals.harness import BenchRecipe, run_bench

    if not args.model and not args.predictions:
        raise RecipeError("eval: give --model DIR (a causal-LM folder) or --predictions FILE.jsonl")
    data = dict(_named(d) for d in args.data)
    names = [t.strip() for t in args.task.split(",") if t.strip()]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise RecipeError(f"--data names task(s) not in --task: {', '.join(unknown)}")
    spec = {
        "stage": "eval", "run": {"dir": args.out, "seed": args.seed},
        "tasks": [{"name": n, "data": data.get(n), "limit": args.limit, "shots": args.shots} for n in names],
        "checkpoints": [{"name": n, "path": p} for n, p in map(_named, args.model)]
        + [{"name": n, "predictions": p} for n, p in map(_named, args.predictions)],
        "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "reward_model": args.reward_model, "baseline": args.baseline, "num_threads": args.threads,
    }  # fmt: skip
    recipe = build(BenchRecipe, spec, source="glmwb eval")
    run_bench(recipe)
    print(f"results → {Path(args.out) / 'results.json'}, table → {Path(args.out) / 'table.md'}")
    return 0


def cmd_compare_methods(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.stage != "compare_methods":
        raise RecipeError(
            f"{args.recipe}: compare-methods needs a 'stage: compare_methods' recipe, got {recipe.stage!r}"
        )
    run_stage(recipe)
    return 0


def cmd_serve_rewards(args: argparse.Namespace) -> int:
    from glmwb.rewards.server import serve

    if not (Path(args.model) / "config.json").is_file():
        raise RecipeError(f"no reward folder at {args.model!r} (expected config.json there)")
    return serve(args)


def _add_run(sub) -> None:
    """`glmwb run RECIPE [overrides] [--only | --from] [--dry-run ...]`."""
    r = sub.add_parser("run", help="run a recipe (a stage or a pipeline)", description="Run a recipe.")
    r.add_argument("recipe", help="a YAML recipe, e.g. recipes/quickstart.yaml")
    r.add_argument(
        "overrides",
        nargs="*",
        help="section.key=value overrides, applied last "
        "(in a pipeline, STAGE.section.key=value targets one stage)",
    )
    r.add_argument("--only", metavar="A,B", help="pipeline: run only these stages")
    r.add_argument(
        "--from",
        dest="start",
        metavar="STAGE",
        help="pipeline: run from this stage on (reusing earlier outputs)",
    )
    r.add_argument(
        "--dry-run",
        action="store_true",
        help="pretrain: estimate GPU memory (by ZeRO stage) and step time; allocate nothing",
    )
    r.add_argument("--gpus", type=int, default=None, help="--dry-run: GPUs (default: WORLD_SIZE, else 8)")
    r.add_argument("--gpu", default="H100", help="--dry-run: the GPU's name in pretrain/flops.py's table")
    r.add_argument("--gpu-memory", type=float, default=80.0, help="--dry-run: GB per GPU")
    r.add_argument("--mfu", type=float, default=0.4, help="--dry-run: the MFU assumed for the step time")
    r.set_defaults(func=cmd_run)


def _add_eval(sub) -> None:
    """`glmwb eval --task ... --model ...` (docs/evaluation.md)."""
    e = sub.add_parser(
        "eval",
        help="benchmark scores of model folders or of prediction files (GSM8K, IFEval, HumanEval, ...)",
        description="Score checkpoints on benchmark tasks (docs/evaluation.md); several are compared "
        "with the first (paired tests).",
    )
    e.add_argument("--task", required=True, help="comma-separated: gsm8k, arithmetic, ifeval, mc, humaneval, "
                   "world, needle, winrate")  # fmt: skip
    e.add_argument("--model", action="append", default=[], metavar="[NAME=]DIR", help="a causal-LM folder")
    e.add_argument("--predictions", action="append", default=[], metavar="[NAME=]FILE",
                   help="JSONL {id, prediction[, task]} made elsewhere")  # fmt: skip
    e.add_argument("--data", action="append", default=[], metavar="TASK=PATH", help="a task's data file")
    e.add_argument("--limit", type=int, default=0, help="the first N items of each task (0: all)")
    e.add_argument("--shots", type=int, default=0, help="solved examples as earlier turns (GSM8K)")
    e.add_argument("--out", default="runs/eval", help="the output folder (and the per-item cache)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-new-tokens", type=int, default=0, help="0: each task's own")
    e.add_argument("--reward-model", default=None, help="a reward folder: a reward per answer, RM win rates")
    e.add_argument("--baseline", default=None, help="the checkpoint the others are compared with")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    e.set_defaults(func=cmd_eval)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="glmwb", description="glm-workbench: RLHF for GLM models, recipe-driven."
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_run(sub)

    v = sub.add_parser(
        "validate",
        help="check a recipe and print it fully resolved",
        description="Check a recipe strictly and print the resolved config.",
    )
    v.add_argument("recipe")
    v.add_argument("overrides", nargs="*")
    v.set_defaults(func=cmd_validate)

    w = sub.add_parser(
        "world",
        help="write the embedded world's corpus and prompts as JSONL",
        description="Write the embedded synthetic world (corpus, train / held-out prompts).",
    )
    w.add_argument("--out", required=True)
    w.add_argument("--seed", type=int, default=0)
    w.set_defaults(func=cmd_world)

    _add_eval(sub)

    s = sub.add_parser("sample", help="chat with a trained model folder", description="Generate answers.")
    s.add_argument("model", help="a Hugging Face GLM folder (ours or transformers')")
    s.add_argument("prompts", nargs="+")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.set_defaults(func=cmd_sample)

    from glmwb.recipes.annotation_cli import register as register_annotation

    register_annotation(sub)  # glmwb annotate, glmwb annotation ...

    from glmwb.recipes.arena_cli import register as register_arena

    register_arena(sub)  # glmwb arena leaderboard, ...

    from glmwb.recipes.argilla_cli import register as register_argilla

    register_argilla(sub)  # glmwb argilla push | pull | status, glmwb argilla-server

    from glmwb.rewards.server import add_arguments as reward_server_arguments

    cm = sub.add_parser(
        "compare-methods",
        help="alignment methods side by side from one SFT policy, equal step budgets",
        description="Train DPO, iterative RPO, KTO, PPO (rule / RM), GRPO from one SFT policy with the same "
        "step budget on several seeds; print and plot one table (recipes/compare_methods.yaml).",
    )
    cm.add_argument("recipe", nargs="?", default="recipes/compare_methods.yaml")
    cm.add_argument("overrides", nargs="*", help="section.key=value overrides")
    cm.set_defaults(func=cmd_compare_methods)

    sr = sub.add_parser(
        "serve-rewards",
        help="serve a reward model over HTTP (POST /score)",
        description="Serve a reward folder over HTTP: POST /score, POST /score_heads, GET /health.",
    )
    reward_server_arguments(sr)
    sr.set_defaults(func=cmd_serve_rewards)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``key=value`` overrides of run / validate may also follow the options
    (``glmwb run quickstart.yaml --only sft sft.train.max_steps=10``)."""
    parser = make_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "overrides", None) is None or not all(
            "=" in x and not x.startswith("-") for x in extra
        ):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, CheckpointError) as e:  # a stage's or the loader's one-line user error
        print(f"glmwb: error: {e}", file=sys.stderr)
        return USER_ERROR
    except FileNotFoundError as e:
        print(f"glmwb: error: {e}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print("glmwb: interrupted; the newest checkpoint in the run folder resumes the run", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
