"""Streaming exact + near-duplicate removal, and the measurement of our MinHash + LSH against datasketch's.

``StreamingDedup`` applies ``data.exact_dedup`` and ``data.near_dedup``'s rules one batch of documents at a
time: a document is dropped when its ``dedup_key`` equals a kept one's (128-bit BLAKE2b) or when its
estimated Jaccard similarity with a kept document that shares an LSH bucket reaches the threshold. Its state
is per kept document (16 bytes of digest + the ``num_perm`` x 4 bytes signature + one dict entry per band),
never the text, and can be saved and restored exactly (``state_arrays`` / ``restore``), which is how the
sharded pipeline resumes.

``compare_with_datasketch`` runs both implementations with the same parameters (character shingles of
``dedup_key``, ``num_perm``, the same (bands, rows), verification at the same threshold) over the same
documents and reports the pairs each finds, their agreement, how many of each are true pairs by the exact
shingle Jaccard, and the MB/s of each (docs/results/2026-12-07-pretrain-data-pipeline.md).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from glmwb.pretrain.data import (
    DedupConfig,
    _bands_rows,
    dedup_key,
    estimate_jaccard,
    minhash_signatures,
    shingles,
)


def _band_mult(cfg: DedupConfig, rows: int) -> np.ndarray:
    rng = np.random.default_rng([cfg.seed, 0xBA5D])
    return rng.integers(0, 2**64, size=rows, dtype=np.uint64) | np.uint64(1)


def exact_digest(text: str) -> bytes:
    return hashlib.blake2b(dedup_key(text).encode("utf-8"), digest_size=16).digest()


class StreamingDedup:
    """Exact and MinHash-LSH near-duplicate removal over a stream of batches; the first occurrence is kept."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self.bands, self.rows = _bands_rows(cfg)
        self._mult = _band_mult(cfg, self.rows)
        self._exact: set[bytes] = set()
        self._buckets: list[dict[int, list[int]]] = [{} for _ in range(self.bands)]
        self._sigs = np.empty((64, cfg.num_perm), dtype=np.uint32)  # kept documents' signatures
        self.kept = 0

    def _band_keys(self, sigs: np.ndarray) -> list[list[int]]:
        band = sigs[:, : self.bands * self.rows].astype(np.uint64).reshape(len(sigs), self.bands, self.rows)
        return (band * self._mult).sum(axis=2).tolist()  # wraps mod 2^64

    def _add(self, digest: bytes, sig: np.ndarray | None, keys: list[int] | None) -> None:
        self._exact.add(digest)
        if sig is not None:
            if self.kept == len(self._sigs):
                self._sigs = np.concatenate([self._sigs, np.empty_like(self._sigs)])
            self._sigs[self.kept] = sig
            for b, key in enumerate(keys):
                self._buckets[b].setdefault(key, []).append(self.kept)
        self.kept += 1

    def process(self, texts: Sequence[str]) -> tuple[list[str | None], bytes, np.ndarray]:
        """Per text: None (kept) or "exact" / "near"; and the digests (16 bytes each) and signatures
        (num_perm uint32 each; zero rows when near dedup is off) of the kept texts, in order."""
        cfg = self.cfg
        digests = [exact_digest(t) for t in texts]
        sigs = minhash_signatures(texts, cfg) if cfg.near and len(texts) else None
        keys = self._band_keys(sigs) if sigs is not None else None
        verdicts: list[str | None] = []
        kept_digests, kept_rows = [], []
        for i, digest in enumerate(digests):
            if cfg.exact and digest in self._exact:
                verdicts.append("exact")
                continue
            if sigs is not None:
                cand = {c for b, key in enumerate(keys[i]) for c in self._buckets[b].get(key, ())}
                if cand:
                    idx = np.fromiter(cand, dtype=np.int64, count=len(cand))
                    if np.max(estimate_jaccard(self._sigs[idx], sigs[i])) >= cfg.threshold:
                        verdicts.append("near")
                        continue
            verdicts.append(None)
            self._add(digest, None if sigs is None else sigs[i], None if keys is None else keys[i])
            kept_digests.append(digest)
            kept_rows.append(i)
        out_sigs = sigs[kept_rows] if sigs is not None else np.zeros((len(kept_rows), 0), dtype=np.uint32)
        return verdicts, b"".join(kept_digests), out_sigs

    def restore(self, digests: bytes, sigs: np.ndarray) -> None:
        """Add kept documents saved by an earlier run (their digests and signatures, in order)."""
        n = len(digests) // 16
        near = self.cfg.near and sigs.shape[1] > 0
        keys = self._band_keys(sigs) if near and n else None
        for i in range(n):
            self._add(
                digests[16 * i : 16 * i + 16],
                sigs[i] if near else None,
                keys[i] if keys is not None else None,
            )


# --------------------------------------------------------------------------------------------------
# ours vs datasketch


def _pairs_ours(texts: Sequence[str], cfg: DedupConfig) -> set[tuple[int, int]]:
    """Every (earlier, later) pair that shares an LSH bucket and whose estimated Jaccard >= threshold."""
    sigs = minhash_signatures(texts, cfg)
    bands, rows = _bands_rows(cfg)
    band = sigs[:, : bands * rows].astype(np.uint64).reshape(len(texts), bands, rows)
    keys = (band * _band_mult(cfg, rows)).sum(axis=2).tolist()
    buckets: list[dict[int, list[int]]] = [{} for _ in range(bands)]
    pairs = set()
    for d, dkeys in enumerate(keys):
        cand = {c for b, key in enumerate(dkeys) for c in buckets[b].get(key, ())}
        if cand:
            idx = np.fromiter(sorted(cand), dtype=np.int64, count=len(cand))
            sim = estimate_jaccard(sigs[idx], sigs[d])
            pairs.update((int(c), d) for c in idx[sim >= cfg.threshold])
        for b, key in enumerate(dkeys):
            buckets[b].setdefault(key, []).append(d)
    return pairs


def _pairs_datasketch(texts: Sequence[str], cfg: DedupConfig) -> set[tuple[int, int]]:
    """The same procedure with datasketch: MinHash (its SHA-1 shingle hash) + MinHashLSH(params=(b, r))."""
    from datasketch import MinHash, MinHashLSH

    bands, rows = _bands_rows(cfg)
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, params=(bands, rows))
    hashes: list[MinHash] = []
    pairs = set()
    for d, text in enumerate(texts):
        m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
        m.update_batch([s.encode("utf-8") for s in shingles(text, cfg.shingle_size)])
        for c in lsh.query(m):
            if m.jaccard(hashes[c]) >= cfg.threshold:
                pairs.add((min(c, d), max(c, d)))
        lsh.insert(d, m)
        hashes.append(m)
    return pairs


def true_jaccard(a: str, b: str, k: int) -> float:
    sa, sb = shingles(a, k), shingles(b, k)
    return len(sa & sb) / max(1, len(sa | sb))


def compare_with_datasketch(
    texts: Sequence[str], cfg: DedupConfig | None = None, known: set[tuple[int, int]] = frozenset()
) -> dict[str, Any]:
    """Both implementations on ``texts`` in one run: pairs, agreement, MB/s, and precision / recall against
    the true pairs (exact shingle Jaccard >= threshold) among those either found and the ``known`` (planted)
    ones."""
    cfg = cfg or DedupConfig()
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    found: dict[str, set[tuple[int, int]]] = {}
    out: dict[str, Any] = {"docs": len(texts), "mb": round(mb, 3), "bands_rows": list(_bands_rows(cfg))}
    for name, fn in (("ours", _pairs_ours), ("datasketch", _pairs_datasketch)):
        t0 = time.perf_counter()
        found[name] = fn(texts, cfg)
        seconds = time.perf_counter() - t0
        out[name] = {
            "pairs": len(found[name]),
            "seconds": round(seconds, 3),
            "mb_per_s": round(mb / seconds, 3),
        }
    union = found["ours"] | found["datasketch"]
    truth = {
        p
        for p in union | set(known)
        if true_jaccard(texts[p[0]], texts[p[1]], cfg.shingle_size) >= cfg.threshold
    }
    for name in found:
        out[name]["true_pairs"] = len(found[name] & truth)
        out[name]["precision"] = round(len(found[name] & truth) / max(1, len(found[name])), 4)
        out[name]["recall"] = round(len(found[name] & truth) / max(1, len(truth)), 4)
    both = found["ours"] & found["datasketch"]
    out["agreement"] = {"both": len(both), "only_ours": len(found["ours"] - both),
                        "only_datasketch": len(found["datasketch"] - both),
                        "jaccard": round(len(both) / max(1, len(union)), 4)}  # fmt: skip
    out["true_pairs"] = len(truth)
    out["speedup_ours"] = round(out["datasketch"]["seconds"] / max(1e-9, out["ours"]["seconds"]), 2)
    return out
