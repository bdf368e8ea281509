"""The streaming pretraining data pipeline: sources → mixture → clean → filter → decontaminate → exact + near
dedup → tokenize → split → sharded memory-mapped token files; and the reader that serves packed rows.

Nothing holds the corpus: documents are read lazily (JSONL / text, Parquet, a saved ``datasets`` dataset,
the text field configurable), processed ``batch_bytes`` of text at a time, and written out as shards once
``shard_tokens`` tokens are buffered. Memory is bounded by one batch of text plus one shard of tokens plus
the dedup state (per kept document: a 16-byte digest, its MinHash signature and LSH bucket entries; never its
text). Tokenization is the Hugging Face fast tokenizer's batch encoding, which runs on all cores (Rust,
rayon; ``RAYON_NUM_THREADS`` caps it).

Output folder::

    index.json                     config fingerprint, dtype, tokenizer hash, the finished shards, statistics
    shard_00000.train.bin          the training documents' tokens (uint16, or uint32 for vocabularies > 65535),
    shard_00000.heldout.bin        each document followed by <|endoftext|>, back to back
    shard_00000.docs.npz           per split the document lengths (the boundaries), and the dedup state of the
                                   shard's documents (digests, signatures) that a resumed run reloads
    decontamination.json           what the decontamination stage removed, per evaluation set

A shard is written under a temporary name and renamed when complete; ``index.json`` (also replaced
atomically) lists it afterwards with the input position after its last document. A killed run started again
with the same config reloads the dedup state of the listed shards, re-reads (parses only) the input up to
that position and carries on: finished shards are not redone, and the output is byte-identical to an
uninterrupted run's. Everything is deterministic given the config (the mixture's draws come from ``seed``;
the held-out split is ``data.split_value`` of each document's text).

Mixture: each next document comes from source i with probability weight_i / (sum of the weights of the
sources not yet exhausted). ``stopping: first_exhausted`` ends at the first exhausted source (the proportions
hold throughout); ``all_exhausted`` reads every source to its end.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from glmwb.pretrain.data import (
    REJECT_REASONS,
    DedupConfig,
    FilterConfig,
    clean,
    eot_id,
    iter_texts,
    make_labels,
    quality_filter,
    split_value,
    tokenize,
    tokenizer_hash,
)
from glmwb.pretrain.decontam import DecontamConfig, Decontaminator, DecontamReport
from glmwb.pretrain.dedup import StreamingDedup
from glmwb.pretrain.errors import ConfigError
from glmwb.pretrain.ranges import Fraction, NonNegInt, PositiveFloat, PositiveInt
from glmwb.pretrain.settings import RunConfig

STAGES = ("read", "clean", "filter", "decontaminate", "dedup", "tokenize", "write")
SPLITS = ("train", "heldout")
INDEX = "index.json"


@dataclass(frozen=True)
class SourceConfig:
    """One source of the mixture: files or folders of one format."""

    paths: tuple[str, ...] = ()
    weight: PositiveFloat = 1.0
    text_field: str = "text"
    format: Literal["auto", "jsonl", "parquet", "datasets"] = (
        "auto"  # jsonl also reads .txt (one doc per file)
    )
    split: str = "train"  # of a saved DatasetDict
    name: str | None = None

    def __post_init__(self) -> None:
        if not self.paths:
            raise ValueError("a data source needs paths (JSONL / Parquet files or a saved datasets folder)")


@dataclass(frozen=True)
class PipelineConfig:
    sources: tuple[SourceConfig, ...] = ()
    stopping: Literal["first_exhausted", "all_exhausted"] = "all_exhausted"
    max_docs: PositiveInt | None = None  # documents drawn from the mixture at most
    heldout_fraction: Fraction = 0.02
    filter: FilterConfig | None = field(default_factory=FilterConfig)  # null: keep every non-empty document
    dedup: DedupConfig = field(default_factory=DedupConfig)
    decontaminate: DecontamConfig | None = None
    shard_tokens: PositiveInt = 2**24  # a shard is written once this many tokens are buffered
    batch_bytes: PositiveInt = 4 * 2**20  # text processed per batch
    seed: NonNegInt = 0

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("data pipeline: list at least one source under sources")


def _detect(path: Path) -> str:
    if path.is_dir() and any(
        (path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")
    ):
        return "datasets"
    if path.name.endswith(".parquet") or (path.is_dir() and any(path.rglob("*.parquet"))):
        return "parquet"
    return "jsonl"


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    for f in files:
        pf = pq.ParquetFile(f)
        if text_field not in pf.schema_arrow.names:
            raise ConfigError(f"{f}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
        for batch in pf.iter_batches(batch_size=256, columns=[text_field]):
            yield from batch.column(0).to_pylist()


def _iter_saved_dataset(path: Path, text_field: str, split: str) -> Iterator[str]:
    import datasets

    ds = datasets.load_from_disk(str(path))  # memory-mapped Arrow: rows are read as iterated
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ConfigError(f"{path}: no split {split!r} (splits: {', '.join(ds)})")
        ds = ds[split]
    if text_field not in ds.column_names:
        raise ConfigError(f"{path}: no column {text_field!r} (columns: {', '.join(ds.column_names)})")
    for batch in ds.select_columns([text_field]).iter(batch_size=256):
        yield from batch[text_field]


def iter_source(src: SourceConfig) -> Iterator[str]:
    """The documents of one source, lazily, in file order."""
    for raw in src.paths:
        path = Path(raw)
        if not path.exists():
            raise ConfigError(f"data source: no such file or folder: {path}")
        fmt = _detect(path) if src.format == "auto" else src.format
        if fmt == "parquet":
            yield from _iter_parquet(path, src.text_field)
        elif fmt == "datasets":
            yield from _iter_saved_dataset(path, src.text_field, src.split)
        else:
            yield from iter_texts(path, src.text_field)


def mixture(cfg: PipelineConfig) -> Iterator[tuple[int, str]]:
    """(source index, text) in the mixture's deterministic order (see the module docstring)."""
    iters = [iter_source(s) for s in cfg.sources]
    weights = np.array([s.weight for s in cfg.sources], dtype=np.float64)
    alive = np.ones(len(iters), dtype=bool)
    rng = np.random.default_rng([cfg.seed, 0x313])
    while alive.any():
        p = np.where(alive, weights, 0.0)
        i = int(np.searchsorted(np.cumsum(p), rng.random() * p.sum(), side="right"))
        i = min(i, len(iters) - 1)
        try:
            text = next(iters[i])
        except StopIteration:
            alive[i] = False
            if cfg.stopping == "first_exhausted":
                return
            continue
        if not isinstance(text, str):
            raise ConfigError(f"data source {i}: a record's text is {type(text).__name__}, not a string")
        yield i, text


# --------------------------------------------------------------------------------------------------
# the pipeline


def fingerprint(cfg: PipelineConfig, tok_hash: str) -> str:
    """What decides the output: everything in the config and the tokenizer."""
    blob = json.dumps({"cfg": asdict(cfg), "tokenizer": tok_hash}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _new_stats(cfg: PipelineConfig) -> dict[str, Any]:
    return {"docs_in": 0, "rejected": dict.fromkeys(REJECT_REASONS, 0), "contaminated": 0,
            "exact_duplicates": 0, "near_duplicates": 0, "docs": dict.fromkeys(SPLITS, 0),
            "tokens": dict.fromkeys(SPLITS, 0), "docs_per_source": [0] * len(cfg.sources),
            "seconds": dict.fromkeys(STAGES, 0.0), "bytes": dict.fromkeys(STAGES, 0),
            "decontamination": {}}  # fmt: skip


class _Shards:
    """The shard buffer and the writer of shards and of index.json."""

    def __init__(self, out: Path, index: dict[str, Any], dtype: np.dtype):
        self.out, self.index, self.dtype = out, index, dtype
        self.tokens: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        self.digests: list[bytes] = []
        self.sigs: list[np.ndarray] = []
        self.buffered = 0

    def add(self, split: str, ids: np.ndarray) -> None:
        self.tokens[split].append(ids)
        self.buffered += len(ids)

    def flush(self, next_input: int, stats: dict[str, Any]) -> None:
        k = len(self.index["shards"])
        name = f"shard_{k:05d}"
        record: dict[str, Any] = {"name": name, "next_input": next_input}
        lengths = {}
        for split in SPLITS:
            docs = self.tokens[split]
            arr = np.concatenate(docs).astype(self.dtype) if docs else np.empty(0, self.dtype)
            _write_atomic(self.out / f"{name}.{split}.bin", arr.tofile)
            lengths[split] = np.array([len(d) for d in docs], dtype=np.int64)
            record[f"{split}_docs"], record[f"{split}_tokens"] = len(docs), int(arr.size)
        sigs = np.concatenate(self.sigs) if self.sigs else np.zeros((0, 0), np.uint32)
        digests = np.frombuffer(b"".join(self.digests), dtype=np.uint8)
        _write_atomic(self.out / f"{name}.docs.npz", lambda f: np.savez(f, train_lengths=lengths["train"],
                      heldout_lengths=lengths["heldout"], digests=digests, sigs=sigs))  # fmt: skip
        self.index["shards"].append(record)
        self.index["stats"] = stats
        write_index(self.out, self.index)
        self.tokens = {s: [] for s in SPLITS}
        self.digests, self.sigs, self.buffered = [], [], 0


def _write_atomic(path: Path, write: Callable) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def write_index(out: Path, index: dict[str, Any]) -> None:
    _write_atomic(out / INDEX, lambda f: f.write(json.dumps(index, indent=1, ensure_ascii=False).encode()))


def read_index(out: str | Path) -> dict[str, Any] | None:
    path = Path(out) / INDEX
    return json.loads(path.read_text()) if path.is_file() else None


def _start(cfg: PipelineConfig, tokenizer, out: Path) -> tuple[dict[str, Any], StreamingDedup]:
    """The index to continue (a fresh one when there is none) and the dedup state of its shards."""
    tok_hash = tokenizer_hash(tokenizer)
    fp = fingerprint(cfg, tok_hash)
    index = read_index(out)
    if index is not None and index.get("fingerprint") != fp:
        raise ConfigError(
            f"{out} holds a data build of another config or tokenizer (fingerprint {index.get('fingerprint')}, "
            f"this one {fp}); use a new output folder or delete that one"
        )
    dedup = StreamingDedup(cfg.dedup)
    if index is None:
        vocab = len(tokenizer)
        index = {"format": 1, "fingerprint": fp, "complete": False, "tokenizer_hash": tok_hash,
                 "vocab_size": vocab, "eot_id": eot_id(tokenizer), "dtype": "uint16" if vocab <= 65535 else "uint32",
                 "config": asdict(cfg), "shards": [], "stats": _new_stats(cfg)}  # fmt: skip
        return index, dedup
    for shard in index["shards"]:
        with np.load(out / f"{shard['name']}.docs.npz") as z:
            dedup.restore(z["digests"].tobytes(), z["sigs"])
    return index, dedup


def _batches(cfg: PipelineConfig, start: int, stats: dict[str, Any]) -> Iterator[list[tuple[int, int, str]]]:
    """Batches of (input position, source, text) of about ``batch_bytes``, from input position ``start``."""
    docs = mixture(cfg)
    if cfg.max_docs is not None:
        docs = islice(docs, cfg.max_docs)
    pos = start
    t0 = time.perf_counter()
    for _ in islice(docs, start):  # a resumed run: parsed, not processed again
        pass
    batch, size = [], 0
    for src, text in docs:
        batch.append((pos, src, text))
        pos += 1
        size += len(text)
        if size >= cfg.batch_bytes:
            stats["seconds"]["read"] += time.perf_counter() - t0
            yield batch
            batch, size, t0 = [], 0, time.perf_counter()
    stats["seconds"]["read"] += time.perf_counter() - t0
    if batch:
        yield batch


def _timed(stats: dict[str, Any], stage: str, texts: list[str]) -> Callable[[], None]:
    stats["bytes"][stage] += sum(len(t.encode("utf-8")) for t in texts)
    t0 = time.perf_counter()

    def done() -> None:
        stats["seconds"][stage] += time.perf_counter() - t0

    return done


def encode_docs(texts: list[str], tokenizer) -> list[np.ndarray]:
    """``data.tokenize``'s ids (each text + <|endoftext|>), through the Rust tokenizer's batch encoding without
    offsets (all cores; about twice as fast as the Python wrapper's call, same ids)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not texts:
        return tokenize(texts, tokenizer)
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    sep = eot_id(tokenizer)
    out = []
    for enc in encode(texts, add_special_tokens=False):
        arr = np.empty(len(enc.ids) + 1, dtype=np.int32)
        arr[:-1] = enc.ids
        arr[-1] = sep
        out.append(arr)
    return out


def _select(texts, positions, keep):
    return [t for t, k in zip(texts, keep, strict=True) if k], [
        p for p, k in zip(positions, keep, strict=True) if k
    ]


def _process(batch, cfg, tokenizer, dedup, decon, report, stats, shards: _Shards) -> None:
    """One batch through clean → filter → decontaminate → dedup → tokenize → split, into the shard buffer."""
    positions = [p for p, _, _ in batch]
    stats["docs_in"] += len(batch)
    for _, src, _ in batch:
        stats["docs_per_source"][src] += 1
    raw = [t for _, _, t in batch]
    stats["bytes"]["read"] += sum(len(t.encode("utf-8")) for t in raw)
    done = _timed(stats, "clean", raw)
    texts = [clean(t) for t in raw]
    done()
    done = _timed(stats, "filter", texts)
    filter_cfg = cfg.filter or FilterConfig.accept_all()
    reasons = [quality_filter(t, filter_cfg) for t in texts]
    for r in reasons:
        if r is not None:
            stats["rejected"][r] += 1
    texts, positions = _select(texts, positions, [r is None for r in reasons])
    done()
    if decon is not None:
        done = _timed(stats, "decontaminate", texts)
        hits = [decon.match(t) for t in texts]
        for t, p, h in zip(texts, positions, hits, strict=True):
            if h is not None:
                report.add(h, p, t, cfg.decontaminate.examples)
        stats["contaminated"] += sum(h is not None for h in hits)
        texts, positions = _select(texts, positions, [h is None for h in hits])
        done()
    done = _timed(stats, "dedup", texts)
    verdicts, digests, sigs = dedup.process(texts)
    stats["exact_duplicates"] += verdicts.count("exact")
    stats["near_duplicates"] += verdicts.count("near")
    texts, positions = _select(texts, positions, [v is None for v in verdicts])
    done()
    done = _timed(stats, "tokenize", texts)
    ids = encode_docs(texts, tokenizer)
    done()
    for text, arr in zip(texts, ids, strict=True):
        split = "heldout" if split_value(text) < cfg.heldout_fraction else "train"
        shards.add(split, arr)
        stats["docs"][split] += 1
        stats["tokens"][split] += len(arr)
    shards.digests.append(digests)
    shards.sigs.append(sigs)


def run_pipeline(
    cfg: PipelineConfig, tokenizer, out_dir: str | Path, on_shard: Callable[[int], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:  # fmt: skip
    """Build (or finish building) the sharded token files of ``cfg`` in ``out_dir``; returns the statistics.

    ``on_shard(k)`` is called after shard k is listed in the index (tests use it to simulate a kill)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index, dedup = _start(cfg, tokenizer, out)
    if index["complete"]:
        log(f"data: {out} is complete ({len(index['shards'])} shards); nothing to do")
        return index["stats"]
    stats = index["stats"]
    report = DecontamReport.from_dict(stats["decontamination"])
    decon = Decontaminator(cfg.decontaminate) if cfg.decontaminate and cfg.decontaminate.evals else None
    shards = _Shards(out, index, np.dtype(index["dtype"]))
    start = index["shards"][-1]["next_input"] if index["shards"] else 0
    if start:
        log(f"data: resuming after {len(index['shards'])} finished shards (input document {start})")
    next_input = start
    for batch in _batches(cfg, start, stats):
        _process(batch, cfg, tokenizer, dedup, decon, report, stats, shards)
        next_input = batch[-1][0] + 1
        if shards.buffered >= cfg.shard_tokens:
            _flush(shards, next_input, stats, report, on_shard)
    if shards.buffered or not index["shards"]:
        _flush(shards, next_input, stats, report, on_shard)
    index["complete"] = True
    write_index(out, index)
    _write_atomic(out / "decontamination.json", lambda f: f.write(json.dumps(
        {"config": asdict(cfg.decontaminate) if cfg.decontaminate else None,
         "items": decon.items if decon else {}, "skipped_short_items": decon.skipped if decon else {},
         **report.to_dict()}, indent=1, ensure_ascii=False).encode()))  # fmt: skip
    return stats


def _flush(shards: _Shards, next_input: int, stats, report: DecontamReport, on_shard) -> None:
    t0 = time.perf_counter()
    stats["bytes"]["write"] += shards.buffered * shards.dtype.itemsize
    stats["decontamination"] = report.to_dict()
    shards.flush(next_input, stats)
    stats["seconds"]["write"] += time.perf_counter() - t0
    if on_shard is not None:
        on_shard(len(shards.index["shards"]) - 1)


def stage_mb_per_s(stats: dict[str, Any]) -> dict[str, float]:
    """MB/s of each stage: the UTF-8 text it received (tokens written, for write) / its seconds."""
    return {
        s: round(stats["bytes"][s] / 1e6 / stats["seconds"][s], 2) for s in STAGES if stats["seconds"][s] > 0
    }


# --------------------------------------------------------------------------------------------------
# the reader


class ShardedTokens:
    """One split of a finished build as packed rows of ``seq_len`` tokens, memory-mapped.

    The split's documents are concatenated in shard order and cut into rows as ``data.pack`` does (a document
    continues into the next row; the last partial row is not served). ``batch(indices)`` returns what the
    training loop takes from ``PackedDataset.batch``: input_ids, doc_ids (each token's document within its row,
    from 0; the model masks attention across them and restarts positions) and labels (-100 where a target
    would cross a document boundary)."""

    def __init__(self, folder: str | Path, split: str = "train", seq_len: int = 256):
        folder = Path(folder)
        index = read_index(folder)
        if index is None or not index.get("complete"):
            raise ConfigError(
                f"{folder}: not a finished data build (no complete {INDEX}); run the data stage"
            )
        if split not in SPLITS or seq_len < 2:
            raise ValueError(f"split must be one of {SPLITS} and seq_len >= 2, got {split!r}, {seq_len}")
        self.meta, self.seq_len, self.split = index, seq_len, split
        dtype = np.dtype(index["dtype"])
        self.parts, lengths = [], []
        for shard in index["shards"]:
            if shard[f"{split}_tokens"]:
                self.parts.append(np.memmap(folder / f"{shard['name']}.{split}.bin", dtype=dtype, mode="r"))
            with np.load(folder / f"{shard['name']}.docs.npz") as z:
                lengths.append(z[f"{split}_lengths"])
        self.doc_lengths = np.concatenate(lengths) if lengths else np.empty(0, np.int64)
        self.doc_starts = np.concatenate([[0], np.cumsum(self.doc_lengths)]).astype(np.int64)
        self.part_starts = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])]).astype(np.int64)
        self.num_tokens = int(self.part_starts[-1])
        if self.num_tokens != int(self.doc_starts[-1]):
            raise ValueError(f"{folder}: the {split} token files and document lengths disagree")

    def __len__(self) -> int:
        return self.num_tokens // self.seq_len

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split's concatenation (across shards)."""
        out, pos = [], start
        while pos < stop:
            k = int(np.searchsorted(self.part_starts, pos, side="right")) - 1
            lo = pos - self.part_starts[k]
            hi = min(stop, self.part_starts[k + 1]) - self.part_starts[k]
            out.append(np.asarray(self.parts[k][lo:hi]))
            pos = self.part_starts[k] + hi
        return np.concatenate(out) if out else np.empty(0, np.int64)

    def document(self, i: int) -> np.ndarray:
        return self.tokens(int(self.doc_starts[i]), int(self.doc_starts[i + 1]))

    def rows(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, doc_ids), each (len(indices), seq_len) int64."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"row index out of range [0, {len(self)})")
        T = self.seq_len
        ids = np.stack([self.tokens(int(i) * T, int(i + 1) * T).astype(np.int64) for i in indices])
        pos = indices[:, None] * T + np.arange(T)[None, :]
        doc = np.searchsorted(self.doc_starts, pos, side="right") - 1
        return ids.reshape(len(indices), T), (doc - doc[:, :1]).astype(np.int64)

    def batch(self, indices) -> dict[str, torch.Tensor]:
        input_ids, doc_ids = self.rows(indices)
        return {"input_ids": torch.from_numpy(input_ids), "doc_ids": torch.from_numpy(doc_ids),
                "labels": torch.from_numpy(make_labels(input_ids, doc_ids))}  # fmt: skip

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.batch([i]).items()}

    def token_counts(self, vocab_size: int) -> np.ndarray:
        counts = np.zeros(vocab_size, dtype=np.int64)
        for part in self.parts:
            for s in range(0, len(part), 2**24):
                counts += np.bincount(part[s : s + 2**24], minlength=vocab_size)
        return counts


def load_sharded(folder: str | Path, seq_len: int, tokenizer=None) -> tuple[ShardedTokens, ShardedTokens]:
    """The (train, held-out) token sources of a finished build, checked against ``tokenizer`` when given."""
    train, heldout = ShardedTokens(folder, "train", seq_len), ShardedTokens(folder, "heldout", seq_len)
    if tokenizer is not None and train.meta["tokenizer_hash"] != tokenizer_hash(tokenizer):
        raise ConfigError(f"{folder} was tokenized with another tokenizer than data.tokenizer; rebuild it")
    for name, data in (("train", train), ("held-out", heldout)):
        if len(data) == 0:
            raise ConfigError(
                f"{folder}: the {name} split has {data.num_tokens} tokens, fewer than one row of "
                f"seq_len={seq_len}; give more text, a larger heldout_fraction or a shorter seq_len"
            )
    return train, heldout


# --------------------------------------------------------------------------------------------------
# the `data` recipe stage


@dataclass(frozen=True, kw_only=True)
class DataRecipe:
    """`stage: data` — the streaming pipeline into run.dir, the folder a pretrain recipe's ``data.shards`` names."""

    stage: Literal["data"] = "data"
    run: RunConfig = field(default_factory=RunConfig)
    tokenizer: str = "runs/tokenizer"  # a Hugging Face tokenizer folder
    pipeline: PipelineConfig


def run_data(recipe: DataRecipe) -> dict[str, Any]:
    from glmwb.pretrain.run import load_tokenizer

    tok = load_tokenizer(recipe.tokenizer)
    out = Path(recipe.run.dir)
    t0 = time.perf_counter()
    stats = run_pipeline(recipe.pipeline, tok, out)
    speeds = stage_mb_per_s(stats)
    print(
        f"data: {stats['docs_in']} documents in, {stats['docs']['train']} train / {stats['docs']['heldout']} "
        f"held-out kept ({stats['tokens']['train']:,} / {stats['tokens']['heldout']:,} tokens); rejected "
        f"{sum(stats['rejected'].values())}, contaminated {stats['contaminated']}, duplicates "
        f"{stats['exact_duplicates']} exact + {stats['near_duplicates']} near; {time.perf_counter() - t0:.1f} s; "
        f"MB/s per stage {speeds} → {out}"
    )
    return {"out": str(out), **{k: stats[k] for k in ("docs_in", "docs", "tokens", "contaminated")},
            "mb_per_s": speeds}  # fmt: skip
