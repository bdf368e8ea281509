"""Compare two quickstart run folders figure by figure: the tokenizer files byte for byte, every stage's metrics.jsonl rows and summary.json figures (timing fields and run-folder paths left out).
usage: python docs/results/data/compare_runs.py BEFORE AFTER [stage ...]"""

import hashlib
import json
import math
import re
import sys
from pathlib import Path

TIMING = re.compile(
    r"(second|_s$|^s$|time|minute|elapsed|per_s|tok_s|date|path|dir$|_dir|folder|commit|host|machine|started|finished|wall|device|version|python|torch)",
    re.I,
)


def flat(o, p=""):
    if isinstance(o, dict):
        for k, v in o.items():
            yield from flat(v, f"{p}.{k}" if p else str(k))
    elif isinstance(o, list) and all(not isinstance(x, (dict, list)) for x in o) and len(o) < 50:
        yield p, tuple(o)
    elif isinstance(o, list):
        for i, v in enumerate(o):
            yield from flat(v, f"{p}[{i}]")
    else:
        yield p, o


def norm(o, root):
    if isinstance(o, str):
        return o.replace(str(root), "<run>")
    if isinstance(o, dict):
        return {k: norm(v, root) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [norm(v, root) for v in o]
    return o


def cmp(a, b, what):
    a, b = norm(a, before), norm(b, after)
    fa = {k: v for k, v in flat(a) if not TIMING.search(k)}
    fb = {k: v for k, v in flat(b) if not TIMING.search(k)}
    common = sorted(set(fa) & set(fb))
    diff = [
        (k, fa[k], fb[k])
        for k in common
        if fa[k] != fb[k]
        and not (
            isinstance(fa[k], float) and isinstance(fb[k], float) and math.isnan(fa[k]) and math.isnan(fb[k])
        )
    ]
    print(
        f"  {what}: {len(common)} shared figures, {len(diff)} differ; only before: {len(set(fa) - set(fb))}, only after: {len(set(fb) - set(fa))}"
    )
    for k, x, y in diff[:15]:
        print(f"    DIFF {k}: {x!r} -> {y!r}")
    if len(set(fa) - set(fb)) or len(set(fb) - set(fa)):
        print("    only before:", sorted(set(fa) - set(fb))[:12])
        print("    only after:", sorted(set(fb) - set(fa))[:12])
    return len(diff)


before, after = Path(sys.argv[1]), Path(sys.argv[2])
stages = sys.argv[3:] or ["tokenizer", "pretrain", "sft", "preferences", "reward"]
bad = 0
for st in stages:
    print(f"== {st}")
    A, B = before / st, after / st
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preferences.jsonl"]:
        if (A / f).exists() and (B / f).exists():
            same = (
                hashlib.sha256((A / f).read_bytes()).hexdigest()
                == hashlib.sha256((B / f).read_bytes()).hexdigest()
            )
            print(
                f"  {f}: {'identical bytes' if same else 'different bytes (figures compared below, run paths normalised)'}"
            )
            if not same and f.endswith("jsonl"):
                ra = [json.loads(line) for line in (A / f).open()]
                rb = [json.loads(line) for line in (B / f).open()]
                print(f"    rows {len(ra)} vs {len(rb)}")
                bad += cmp(ra, rb, f)
    if (A / "metrics.jsonl").exists() and (B / "metrics.jsonl").exists():
        ra = [json.loads(line) for line in (A / "metrics.jsonl").open()]
        rb = [json.loads(line) for line in (B / "metrics.jsonl").open()]
        print(f"  metrics.jsonl rows: {len(ra)} vs {len(rb)}")
        bad += cmp(ra, rb, "metrics.jsonl")
    if (A / "summary.json").exists() and (B / "summary.json").exists():
        bad += cmp(
            json.loads((A / "summary.json").read_text()),
            json.loads((B / "summary.json").read_text()),
            "summary.json",
        )
print("TOTAL differing:", bad)
