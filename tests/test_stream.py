"""The streaming data pipeline (pretrain/stream.py), its dedup (pretrain/dedup.py) and decontamination
(pretrain/decontam.py): bounded memory, no token lost or duplicated, boundaries, resume, determinism."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from glmwb.pretrain.data import DedupConfig, clean, near_dedup, pack, split_value, tokenize
from glmwb.pretrain.decontam import DecontamConfig, EvalSetConfig
from glmwb.pretrain.dedup import StreamingDedup, compare_with_datasketch, true_jaccard
from glmwb.pretrain.errors import ConfigError
from glmwb.pretrain.stream import (
    PipelineConfig,
    ShardedTokens,
    SourceConfig,
    encode_docs,
    load_sharded,
    mixture,
    read_index,
    run_pipeline,
)
from tests.shared_data import SHARED_DATA
from tests.tiny import TINY, one_thread  # noqa: F401 (one_thread: one torch thread in this module)

_rng = np.random.default_rng(123)
WORDS = sorted(
    {"".join(_rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=n)) for n in _rng.integers(3, 9, 600)}
)


def synthetic_docs(n: int, words: int, seed: int) -> list[str]:
    """Distinct documents of random words (pairwise shingle Jaccard near 0)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=words)) + "." for _ in range(n)]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    with path.open("w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({field: t}) + "\n")
    return path


@pytest.fixture(scope="module")
def tok():
    from glmwb.pretrain.tokenizer import train_tokenizer

    return train_tokenizer(synthetic_docs(400, 100, 0), vocab_size=2048, show_progress=False)


def mutate(text: str, seed: int, edits: int = 3) -> str:
    """A near duplicate: a few words replaced."""
    rng = np.random.default_rng(seed)
    w = text.split()
    for i in rng.choice(len(w), size=edits, replace=False):
        w[i] = "zz" + w[i]
    return " ".join(w)


def cfg_for(*paths: Path, **kw) -> PipelineConfig:
    kw.setdefault("filter", None)
    kw.setdefault("dedup", DedupConfig(near=True))
    return PipelineConfig(sources=(SourceConfig(paths=tuple(map(str, paths))),), **kw)


def expected_docs(texts: list[str], cfg: PipelineConfig) -> list[str]:
    """What the pipeline must keep, computed in memory by the non-streaming functions of data.py."""
    docs = [clean(t) for t in texts]
    docs = [d for d in docs if d]
    return [docs[i] for i in near_dedup(docs, cfg.dedup)]


# --------------------------------------------------------------------------------------------- streaming


def test_corpus_larger_than_memory_cap_streams_in_bounded_memory(tmp_path, tok):
    """A corpus larger than a 1.4 MiB cap goes through the whole pipeline while Python's heap (tracemalloc sees
    every str, list and numpy allocation) grows by less than the cap: only a batch of text and a shard of
    tokens are buffered, and the dedup state is per kept document (digest + signature), not its text."""
    texts = synthetic_docs(170, 2000, 1)  # ~12 KB each
    src = write_jsonl(tmp_path / "big.jsonl", texts)
    cap = 1.4 * 2**20
    assert src.stat().st_size > 1.35 * cap
    cfg = cfg_for(src, batch_bytes=16 * 1024, shard_tokens=2**13,
                  dedup=DedupConfig(near=True, num_perm=64, chunk_shingles=512))  # fmt: skip
    del texts
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        stats = run_pipeline(cfg, tok, tmp_path / "out", log=lambda s: None)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert stats["docs_in"] == 170 and stats["docs"]["train"] + stats["docs"]["heldout"] == 170
    assert len(read_index(tmp_path / "out")["shards"]) > 20
    assert peak < cap, f"peak heap growth {peak / 2**20:.2f} MiB"


def test_shards_lose_and_duplicate_no_token_and_keep_boundaries(tmp_path, tok):
    base = synthetic_docs(120, 60, 2)
    texts = base + [
        mutate(base[5], 1),
        base[7],
        "  " + base[9].upper() + " ",
    ]  # near, exact, exact (case/space)
    src = write_jsonl(tmp_path / "c.jsonl", texts)
    cfg = cfg_for(src, batch_bytes=2000, shard_tokens=800, heldout_fraction=0.2)
    stats = run_pipeline(cfg, tok, tmp_path / "out", log=lambda s: None)
    keep = expected_docs(texts, cfg)
    assert len(keep) == 120 and stats["near_duplicates"] == 1 and stats["exact_duplicates"] == 2
    assert len(read_index(tmp_path / "out")["shards"]) >= 4
    for split in ("train", "heldout"):
        want = [d for d in keep if (split_value(d) < 0.2) == (split == "heldout")]
        data = ShardedTokens(tmp_path / "out", split, seq_len=16)
        ref_ids = tokenize(want, tok)
        assert len(data.doc_lengths) == len(want) and data.num_tokens == sum(map(len, ref_ids))
        for i, ids in enumerate(ref_ids):  # every document whole, in order, ending with <|endoftext|>
            np.testing.assert_array_equal(data.document(i), ids)
        ref = pack(ref_ids, 16)  # rows across shard edges equal in-memory packing, doc_ids included
        got = data.batch(np.arange(len(data)))
        np.testing.assert_array_equal(got["input_ids"].numpy(), ref["input_ids"])
        np.testing.assert_array_equal(got["doc_ids"].numpy(), ref["doc_ids"])
        np.testing.assert_array_equal(got["labels"].numpy(), ref["labels"])


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard_*")) if not p.name.endswith(".tmp")}


def test_resume_after_kill_redoes_no_finished_shard_and_matches_uninterrupted(tmp_path, tok):
    base = synthetic_docs(150, 60, 3)
    texts = base + [mutate(base[i], i) for i in range(0, 150, 10)]
    src = write_jsonl(tmp_path / "c.jsonl", texts)
    cfg = cfg_for(src, batch_bytes=3000, shard_tokens=1000, heldout_fraction=0.1)
    run_pipeline(cfg, tok, tmp_path / "full", log=lambda s: None)

    class Killed(Exception):
        pass

    def kill_at(k: int) -> None:
        if k == 2:
            (tmp_path / "cut" / "shard_00003.train.bin.tmp").write_bytes(b"half a shard")  # killed mid-write
            raise Killed

    with pytest.raises(Killed):
        run_pipeline(cfg, tok, tmp_path / "cut", on_shard=kill_at, log=lambda s: None)
    assert not read_index(tmp_path / "cut")["complete"] and len(read_index(tmp_path / "cut")["shards"]) == 3
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cut").glob("shard_0000[012].*")}
    logs: list[str] = []
    stats = run_pipeline(cfg, tok, tmp_path / "cut", log=logs.append)
    assert any("resuming after 3 finished shards" in line for line in logs)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cut").glob("shard_0000[012].*")} == before
    full = _shard_bytes(tmp_path / "full")
    assert _shard_bytes(tmp_path / "cut") == full and len(full) > 12  # byte-identical, so deterministic too
    assert stats["near_duplicates"] == 15 == read_index(tmp_path / "full")["stats"]["near_duplicates"]
    assert stats["docs_in"] == len(texts)
    with pytest.raises(ConfigError, match="another config"):
        run_pipeline(replace(cfg, seed=1), tok, tmp_path / "cut", log=lambda s: None)


def test_weighted_mixture_is_deterministic_and_follows_weights(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [f"a{i}" for i in range(3000)])
    b = write_jsonl(tmp_path / "b.jsonl", [f"b{i}" for i in range(3000)])
    cfg = PipelineConfig(sources=(SourceConfig(paths=(str(a),), weight=3.0), SourceConfig(paths=(str(b),))),
                         stopping="first_exhausted")  # fmt: skip
    order = [t for _, t in mixture(cfg)]
    assert order == [t for _, t in mixture(cfg)]
    n_b = sum(t.startswith("b") for t in order)
    assert len(order) - n_b == 3000 and 850 < n_b < 1150  # 3:1 until source a runs out
    assert [t for t in order if t.startswith("a")] == [f"a{i}" for i in range(3000)]  # each source in order
    every = [t for _, t in mixture(replace(cfg, stopping="all_exhausted"))]
    assert len(every) == 6000 and every[: len(order)] == order
    assert [t for _, t in mixture(replace(cfg, seed=5))] != order


def test_parquet_and_saved_datasets_sources_with_a_text_field(tmp_path, tok):
    import datasets

    texts = synthetic_docs(30, 40, 4)
    datasets.Dataset.from_dict({"body": texts[:15], "n": list(range(15))}).to_parquet(tmp_path / "p.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": texts[15:]})}).save_to_disk(
        tmp_path / "ds"
    )
    cfg = PipelineConfig(
        sources=(SourceConfig(paths=(str(tmp_path / "p.parquet"),), text_field="body", weight=1e6),
                 SourceConfig(paths=(str(tmp_path / "ds"),), text_field="body", weight=1e-6)),
        filter=None, heldout_fraction=0.0,
    )  # fmt: skip
    assert [t for _, t in mixture(cfg)] == texts
    run_pipeline(cfg, tok, tmp_path / "out", log=lambda s: None)
    data = ShardedTokens(tmp_path / "out", "train", 8)
    assert data.num_tokens == sum(map(len, tokenize(texts, tok)))
    bad = replace(cfg, sources=(SourceConfig(paths=(str(tmp_path / "p.parquet"),), text_field="text"),))
    with pytest.raises(ConfigError, match="no column 'text'"):
        list(mixture(bad))


def test_encode_docs_equals_the_python_wrapper(tok):
    texts = synthetic_docs(20, 30, 5) + ["中文 text ünïcode"]
    for a, b in zip(encode_docs(texts, tok), tokenize(texts, tok), strict=True):
        np.testing.assert_array_equal(a, b)


def test_load_sharded_refuses_too_little_heldout(tmp_path, tok):
    src = write_jsonl(tmp_path / "c.jsonl", synthetic_docs(10, 30, 6))
    run_pipeline(cfg_for(src, heldout_fraction=0.0), tok, tmp_path / "out", log=lambda s: None)
    with pytest.raises(ConfigError, match="held-out split has 0 tokens"):
        load_sharded(tmp_path / "out", 16, tok)
    with pytest.raises(ConfigError, match="not a finished data build"):
        ShardedTokens(tmp_path / "nothing", "train", 16)


# ------------------------------------------------------------------------------------------------ dedup


def test_streaming_dedup_finds_planted_near_duplicates_and_keeps_distinct_texts():
    base = synthetic_docs(200, 80, 7)
    planted = [mutate(base[i], i, edits=2) for i in range(0, 200, 5)]  # Jaccard ~0.9 with their originals
    assert min(true_jaccard(base[i * 5], p, 5) for i, p in enumerate(planted)) > 0.8
    texts = base + planted
    dd = StreamingDedup(DedupConfig())
    verdicts = []
    for s in range(0, len(texts), 37):  # batches cut anywhere: the same result as one pass
        verdicts += dd.process(texts[s : s + 37])[0]
    assert verdicts[:200] == [None] * 200  # distinct texts all kept
    assert verdicts[200:] == ["near"] * 40  # every planted near duplicate found
    assert [i for i, v in enumerate(verdicts) if v is None] == near_dedup(texts, DedupConfig())


def test_dedup_state_restores_exactly():
    base = synthetic_docs(60, 80, 8)
    first = StreamingDedup(DedupConfig())
    _, digests, sigs = first.process(base[:30])
    again = StreamingDedup(DedupConfig())
    again.restore(digests, sigs)
    later = [mutate(base[3], 1, 2), base[4], *base[30:]]
    assert again.process(later)[0] == first.process(later)[0] == ["near", "exact"] + [None] * 30


def test_ours_and_datasketch_agree_on_planted_pairs():
    base = synthetic_docs(40, 80, 9)
    texts = base + [mutate(base[i], i, edits=2) for i in range(0, 40, 4)]
    planted = {(i, 40 + k) for k, i in enumerate(range(0, 40, 4))}
    cmp = compare_with_datasketch(texts, known=planted)
    assert cmp["ours"]["pairs"] == 10 and cmp["ours"]["precision"] == 1.0 and cmp["ours"]["recall"] == 1.0
    assert cmp["datasketch"]["pairs"] >= 9 and cmp["agreement"]["both"] >= 9
    assert cmp["true_pairs"] == len(planted)


# ------------------------------------------------------------------------------------ decontamination


def test_decontamination_removes_planted_benchmark_items(tmp_path, tok):
    gsm = write_jsonl(tmp_path / "gsm.jsonl", ["Janet has 16 ducks that lay eggs every single morning and she "
                      "sells the remainder at the market for two dollars each day", "short"], field="question")  # fmt: skip
    with gzip.open(tmp_path / "he.jsonl.gz", "wt") as f:
        f.write(
            json.dumps({"prompt": "def add(a, b):\n    return a plus b"}) + "\n"
        )  # 8 words: matched whole
    docs = synthetic_docs(60, 60, 10)
    dirty = {
        3: docs[3] + " Janet has 16 ducks that lay eggs every single morning and she sells more",
        17: "Intro. DEF add(a, b): return A plus B; more text " + docs[17],
        30: docs[30] + " janet has 16 ducks that lay eggs every single morning",
    }  # 10 words < 13: kept
    texts = [dirty.get(i, d) for i, d in enumerate(docs)]
    evals = (
        EvalSetConfig(str(gsm), field="question", name="gsm8k"),
        EvalSetConfig(str(tmp_path / "he.jsonl.gz")),
    )
    cfg = cfg_for(write_jsonl(tmp_path / "c.jsonl", texts), decontaminate=DecontamConfig(evals=evals),
                  heldout_fraction=0.0)  # fmt: skip
    stats = run_pipeline(cfg, tok, tmp_path / "out", log=lambda s: None)
    assert stats["contaminated"] == 2
    report = json.loads((tmp_path / "out" / "decontamination.json").read_text())
    assert report["removed_docs"] == {"gsm8k": 1, tmp_path.name: 1}
    assert sorted(e["input_doc"] for e in report["examples"]) == [3, 17]
    assert report["skipped_short_items"]["gsm8k"] == 1  # "short": under min_n words
    data = ShardedTokens(tmp_path / "out", "train", 8)
    assert data.num_tokens == sum(
        map(len, tokenize([clean(t) for i, t in enumerate(texts) if i not in (3, 17)], tok))
    )


def test_decontamination_real_gsm8k_items(tmp_path, tok):
    path = SHARED_DATA / "eval_gsm8k" / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is absent (../shared/data beside the checkout)")
    items = [json.loads(line)["question"] for line in path.open(encoding="utf-8")][:5]
    docs = synthetic_docs(20, 60, 11)
    texts = docs[:10] + [f"Homework. {q} Answer below." for q in items] + docs[10:]
    cfg = cfg_for(write_jsonl(tmp_path / "c.jsonl", texts), heldout_fraction=0.0,
                  decontaminate=DecontamConfig(evals=(EvalSetConfig(str(path), field="question"),)))  # fmt: skip
    stats = run_pipeline(cfg, tok, tmp_path / "out", log=lambda s: None)
    assert stats["contaminated"] == 5 and stats["docs"]["train"] == 20


def test_unigram_baseline_of_sharded_equals_packed(tmp_path, tok):
    from glmwb.pretrain.data import unigram_entropy

    src = write_jsonl(tmp_path / "c.jsonl", synthetic_docs(80, 40, 12))
    run_pipeline(
        cfg_for(src, heldout_fraction=0.2, shard_tokens=500), tok, tmp_path / "out", log=lambda s: None
    )
    train, held = load_sharded(tmp_path / "out", 16, tok)
    packed_train = np.concatenate([train.document(i) for i in range(len(train.doc_lengths))])
    ids, doc = held.rows(np.arange(len(held)))
    from glmwb.pretrain.data import PackedDataset

    ref = unigram_entropy(packed_train, PackedDataset(ids, doc), len(tok))
    assert unigram_entropy(train, held, len(tok)) == pytest.approx(ref, rel=1e-12)


def test_data_stage_through_the_cli(tmp_path, tok, capsys):
    from glmwb.recipes.cli import main

    tok.save_pretrained(tmp_path / "tok")
    src = write_jsonl(tmp_path / "c.jsonl", synthetic_docs(40, 40, 13))
    recipe = tmp_path / "data.yaml"
    recipe.write_text(
        f"stage: data\nrun: {{dir: {tmp_path / 'out'}}}\ntokenizer: {tmp_path / 'tok'}\n"
        f"pipeline:\n  sources:\n    - {{paths: [{src}], text_field: text}}\n  heldout_fraction: 0.1\n"
    )
    assert main(["run", str(recipe)]) == 0
    assert "40 documents in" in capsys.readouterr().out
    train, held = load_sharded(tmp_path / "out", 8, tok)
    assert len(train.doc_lengths) + len(held.doc_lengths) == 40
    assert main(["run", str(recipe)]) == 0 and "is complete" in capsys.readouterr().out
    recipe.write_text(recipe.read_text().replace(str(src), str(tmp_path / "absent.jsonl")))
    (tmp_path / "out" / "index.json").unlink()
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "no such file or folder" in err and "absent.jsonl" in err and "Traceback" not in err


_KILLED_CHILD = """
import os, signal, sys
from glmwb.pretrain.stream import PipelineConfig, SourceConfig, run_pipeline
from glmwb.pretrain.tokenizer import load_glm_tokenizer

cfg = PipelineConfig(sources=(SourceConfig(paths=(sys.argv[2],)),), filter=None, batch_bytes=3000,
                     shard_tokens=1000, heldout_fraction=0.1)
def on_shard(k):
    if k == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # a real kill, right after shard 1 is listed
run_pipeline(cfg, load_glm_tokenizer(sys.argv[1]), sys.argv[3], on_shard=on_shard, log=lambda s: None)
"""


def test_resume_after_sigkill_of_the_process(tmp_path, tok):
    import subprocess
    import sys

    from glmwb.pretrain.tokenizer import load_glm_tokenizer

    tok.save_pretrained(tmp_path / "tok")
    tok = load_glm_tokenizer(tmp_path / "tok")
    src = write_jsonl(tmp_path / "c.jsonl", synthetic_docs(100, 60, 14))
    cfg = PipelineConfig(sources=(SourceConfig(paths=(str(src),)),), filter=None, batch_bytes=3000,
                         shard_tokens=1000, heldout_fraction=0.1)  # fmt: skip
    child = subprocess.run([sys.executable, "-c", _KILLED_CHILD, str(tmp_path / "tok"), str(src),
                            str(tmp_path / "cut")], capture_output=True, text=True)  # fmt: skip
    assert child.returncode == -9, child.stderr[-2000:]
    assert [s["name"] for s in read_index(tmp_path / "cut")["shards"]] == ["shard_00000", "shard_00001"]
    run_pipeline(cfg, tok, tmp_path / "cut", log=lambda s: None)
    run_pipeline(cfg, tok, tmp_path / "full", log=lambda s: None)
    full = _shard_bytes(tmp_path / "full")
    assert _shard_bytes(tmp_path / "cut") == full and len(full) > 9


def test_training_on_shards_equals_training_on_packed_rows(tmp_path, tiny_tokenizer):
    """The loop takes ShardedTokens where it took PackedDataset: the same documents give the same weights."""
    import torch

    from glmwb.pretrain.data import PackedDataset
    from glmwb.pretrain.model import GLM
    from glmwb.pretrain.optim import OptimConfig
    from glmwb.pretrain.train import TrainConfig, train
    from glmwb.pretrain.world import make_world

    texts = make_world(seed=0, num_entities=16).corpus(300, seed=0)
    src = write_jsonl(tmp_path / "c.jsonl", texts)
    cfg = cfg_for(src, heldout_fraction=0.1, shard_tokens=2000, dedup=DedupConfig(near=False))
    run_pipeline(cfg, tiny_tokenizer, tmp_path / "shards", log=lambda s: None)
    shards = load_sharded(tmp_path / "shards", 32, tiny_tokenizer)
    packed = []
    for data in shards:
        ids, doc = data.rows(np.arange(len(data)))
        packed.append(PackedDataset(ids.astype(np.int32), doc.astype(np.int32)))
    models = []
    for name, (tr, he) in (("shards", shards), ("packed", packed)):
        torch.manual_seed(0)
        model = GLM(TINY.with_(vocab_size=max(TINY.vocab_size, len(tiny_tokenizer))))
        tcfg = TrainConfig(batch_size=4, max_steps=2, eval_every=1000, eval_batches=1, save_every=1000)
        train(model, tiny_tokenizer, tr, he, OptimConfig(lr=3e-3, warmup_steps=1), tcfg, tmp_path / name,
              log=lambda s: None)  # fmt: skip
        models.append(model)
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(p, q)
    torch.manual_seed(0)
    init = GLM(TINY.with_(vocab_size=max(TINY.vocab_size, len(tiny_tokenizer))))
    assert any(not torch.equal(p, q) for p, q in zip(models[0].parameters(), init.parameters(), strict=True))
