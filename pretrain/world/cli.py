"""``python -m glmwb.pretrain.world --out DIR --seed 0``: write a world's corpus, prompts and entities.

Writes ``corpus.jsonl`` (``{"text": ...}``), ``prompts_train.jsonl``, ``prompts_heldout.jsonl`` (one
``Prompt.to_dict()`` per line) and ``world.json``, and prints counts per family and language.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from glmwb.pretrain.world.checking import detect_language
from glmwb.pretrain.world.model import make_world
from glmwb.pretrain.world.tables import FAMILIES, LANGS


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m glmwb.pretrain.world",
        description="The embedded default world: a small bilingual (English / Chinese) synthetic world "
        "with checkable answers.",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-entities", type=int, default=96)
    parser.add_argument("--num-docs", type=int, default=20000)
    parser.add_argument("--num-train", type=int, default=2000, help="train prompts")
    parser.add_argument("--num-heldout", type=int, default=500, help="held-out prompts")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    world = make_world(args.seed, args.num_entities)
    docs = world.corpus(args.num_docs, seed=args.seed)
    splits = {
        s: world.prompts(s, n, seed=args.seed)
        for s, n in (("train", args.num_train), ("heldout", args.num_heldout))
    }
    args.out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(args.out / "corpus.jsonl", [{"text": d} for d in docs])
    for split, prompts in splits.items():
        _write_jsonl(args.out / f"prompts_{split}.jsonl", [p.to_dict() for p in prompts])
    (args.out / "world.json").write_text(
        json.dumps(world.to_dict(), ensure_ascii=False, indent=1), encoding="utf-8"
    )

    doc_langs = Counter(detect_language(d) or "none" for d in docs)
    print(
        f"world seed={args.seed}: {len(world.entities)} entities "
        f"({', '.join(f'{k} {len(v)}' for k, v in world.of_kind.items())})"
    )
    print(
        f"corpus: {len(docs)} docs, {sum(map(len, docs)):,} chars, "
        f"by language {dict(sorted(doc_langs.items()))}"
    )
    for split, prompts in splits.items():
        counts = Counter((p.family, p.lang) for p in prompts)
        table = ", ".join(f"{f}/{lang} {counts[f, lang]}" for f in FAMILIES for lang in LANGS)
        print(f"prompts_{split}: {len(prompts)} ({table})")
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f}s")
    return 0
