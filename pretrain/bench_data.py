"""Benchmark of the streaming data pipeline on the pretraining text in ../shared/data: MB/s of each stage, and
our MinHash + LSH against datasketch's on the same documents with the same parameters, in one run.

    python -m glmwb.pretrain.bench_data [--data ../shared/data] [--dedup-mb 2] [--json out.json]

Stages are timed inside one pipeline run (pretrain/stream.py; MB/s = UTF-8 text into the stage / its seconds,
tokens written x bytes per token for write). The tokenizer is a byte-level BPE (4096 tokens) trained here on
a sample. The dedup comparison takes the first ``--dedup-mb`` MB of each language and plants near duplicates:
a copy of every 20th document with 1 % of its characters replaced (shingle Jaccard about 0.9 with the
original) and of every 20th from the 10th with 2 % replaced (about 0.82: near the 0.8 threshold, where the two
implementations' different hash functions can disagree). The decontamination check plants 20 items of each
evaluation set in the middle of real documents and counts what the stage flags, planted and untouched.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from glmwb.pretrain.data import DedupConfig, iter_texts
from glmwb.pretrain.decontam import DecontamConfig, EvalSetConfig
from glmwb.pretrain.dedup import compare_with_datasketch
from glmwb.pretrain.stream import PipelineConfig, SourceConfig, run_pipeline, stage_mb_per_s


def plant_near_duplicates(
    texts: list[str], every: int = 20, rate: float = 0.01, seed: int = 0, offset: int = 0
) -> list[str]:
    rng = np.random.default_rng(seed)
    out = list(texts)
    for i in range(offset, len(texts), every):
        chars = list(texts[i])
        for p in rng.choice(len(chars), size=max(1, int(rate * len(chars))), replace=False):
            chars[p] = "#"
        out.append("".join(chars))
    return out


def first_mb(path: Path, mb: float) -> list[str]:
    out, size = [], 0
    for t in iter_texts(path):
        out.append(t)
        size += len(t.encode("utf-8"))
        if size >= mb * 1e6:
            break
    return out


def eval_sets(data: Path) -> tuple[EvalSetConfig, ...]:
    return (EvalSetConfig(str(data / "eval_gsm8k" / "test.jsonl"), field="question", name="gsm8k"),
            EvalSetConfig(str(data / "eval_humaneval" / "HumanEval.jsonl.gz"), name="humaneval"),
            EvalSetConfig(str(data / "eval_ifeval" / "input_data.jsonl"), name="ifeval"))  # fmt: skip


def pipeline_bench(data: Path, tmp: Path) -> dict:
    from glmwb.pretrain.tokenizer import train_tokenizer

    evals = eval_sets(data)

    en, zh = data / "pretrain_en" / "pretrain_en.jsonl", data / "pretrain_zh" / "pretrain_zh.jsonl"
    tok = train_tokenizer(first_mb(en, 1) + first_mb(zh, 1), vocab_size=4096, show_progress=False)
    cfg = PipelineConfig(
        sources=(SourceConfig(paths=(str(en),), name="en"), SourceConfig(paths=(str(zh),), name="zh")),
        decontaminate=DecontamConfig(evals=evals), shard_tokens=2**21,
    )  # fmt: skip
    t0 = time.perf_counter()
    stats = run_pipeline(cfg, tok, tmp / "shards", log=lambda s: None)
    total = time.perf_counter() - t0
    mb = stats["bytes"]["read"] / 1e6
    return {"corpus_mb": round(mb, 2), "wall_seconds": round(total, 2), "end_to_end_mb_per_s": round(mb / total, 2),
            "mb_per_s": stage_mb_per_s(stats), "seconds": {k: round(v, 2) for k, v in stats["seconds"].items()},
            "docs_in": stats["docs_in"], "docs": stats["docs"], "tokens": stats["tokens"],
            "rejected": stats["rejected"], "contaminated": stats["contaminated"],
            "removed_per_eval": stats["decontamination"]["removed_docs"],
            "exact_duplicates": stats["exact_duplicates"], "near_duplicates": stats["near_duplicates"],
            "shards": len(json.loads((tmp / "shards" / "index.json").read_text())["shards"])}  # fmt: skip


_THREADS_CHILD = """
import json, sys, time
from glmwb.pretrain.stream import encode_docs
from glmwb.pretrain.tokenizer import load_glm_tokenizer
tok = load_glm_tokenizer(sys.argv[1])
texts = json.load(open(sys.argv[2]))
encode_docs(texts[:20], tok)
t0 = time.perf_counter()
encode_docs(texts, tok)
print(time.perf_counter() - t0)
"""


def tokenize_threads(data: Path, tmp: Path, mb: float = 2.0) -> dict:
    """Tokenization MB/s with the Rust thread pool capped at 1 thread and at every core, same text."""
    import sys

    from glmwb.pretrain.tokenizer import train_tokenizer

    texts = first_mb(data / "pretrain_en" / "pretrain_en.jsonl", mb / 2)
    texts += first_mb(data / "pretrain_zh" / "pretrain_zh.jsonl", mb / 2)
    train_tokenizer(texts[:200], vocab_size=4096, show_progress=False).save_pretrained(tmp / "tok")
    (tmp / "texts.json").write_text(json.dumps(texts))
    size = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    out = {"mb": round(size, 2)}
    for threads in (1, os.cpu_count()):
        env = {**os.environ, "RAYON_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-c", _THREADS_CHILD, str(tmp / "tok"), str(tmp / "texts.json")]
        seconds = float(
            subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.split()[-1]
        )
        out[f"{threads}_threads_mb_per_s"] = round(size / seconds, 2)
    return out


def decontam_check(data: Path, evals, per_set: int = 20) -> dict:
    """The decontamination stage on the real corpus with ``per_set`` items of each evaluation set planted in the
    middle of real documents: documents flagged among the planted and among the untouched ones."""
    from glmwb.pretrain.decontam import Decontaminator, read_eval_items

    t0 = time.perf_counter()
    decon = Decontaminator(DecontamConfig(evals=evals))
    out: dict = {"build_seconds": round(time.perf_counter() - t0, 2), "items": decon.items,
                 "skipped_short_items": decon.skipped, "planted": {}, "removed_planted": {}}  # fmt: skip
    docs = first_mb(data / "pretrain_en" / "pretrain_en.jsonl", 3) + first_mb(
        data / "pretrain_zh" / "pretrain_zh.jsonl", 3
    )
    rng = np.random.default_rng(0)
    for ev in evals:
        items = read_eval_items(ev)
        picks = rng.choice(len(items), size=per_set, replace=False)
        hits = 0
        for k, i in enumerate(picks):
            doc = docs[(7 * k) % len(docs)]
            mid = len(doc) // 2
            hits += decon.match(doc[:mid] + "\n" + items[i] + "\n" + doc[mid:]) is not None
        out["planted"][ev.name], out["removed_planted"][ev.name] = per_set, hits
    t0 = time.perf_counter()
    out["flagged_untouched"] = sum(decon.match(d) is not None for d in docs)
    out["untouched_docs"], out["untouched_mb_per_s"] = (
        len(docs),
        round(sum(len(d.encode("utf-8")) for d in docs) / 1e6 / (time.perf_counter() - t0), 2),
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--dedup-mb", type=float, default=2.0, help="MB of each language in the dedup comparison")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    data = Path(args.data)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU"}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        result["tokenize_threads"] = tokenize_threads(data, Path(tmp))
        print(json.dumps(result["tokenize_threads"]))
        result["pipeline"] = pipeline_bench(data, Path(tmp))
    print(json.dumps(result["pipeline"], indent=1, ensure_ascii=False))
    result["decontamination"] = decontam_check(data, eval_sets(data))
    print(json.dumps(result["decontamination"]))
    texts = first_mb(data / "pretrain_en" / "pretrain_en.jsonl", args.dedup_mb)
    texts += first_mb(data / "pretrain_zh" / "pretrain_zh.jsonl", args.dedup_mb)
    n = len(texts)
    first, second = range(0, n, 20), range(10, n, 20)
    texts = (
        texts
        + plant_near_duplicates(texts)[n:]
        + plant_near_duplicates(texts, rate=0.02, offset=10, seed=1)[n:]
    )
    known = {(i, n + k) for k, i in enumerate(first)} | {
        (i, n + len(first) + k) for k, i in enumerate(second)
    }
    result["dedup"] = compare_with_datasketch(texts, DedupConfig(), known)
    result["dedup"]["planted"] = len(texts) - n
    print(json.dumps(result["dedup"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
