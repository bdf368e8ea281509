"""The pretraining data pipeline: read → clean → filter → exact + near dedup → split → tokenize → pack.

Each stage is a plain function; ``build_dataset`` composes them and writes::

    out_dir/train/{tokens.npy, doc_ids.npy, meta.json}    (N_rows, seq_len) int32 memmaps
    out_dir/heldout/{tokens.npy, doc_ids.npy, meta.json}
    out_dir/stats.json                                    docs in, rejections per reason, duplicates, tokens, rows

Packed rows. Documents (each followed by ``<|endoftext|>``) are concatenated and cut into rows of
``seq_len`` tokens; a document longer than the rest of a row continues at the start of the next one,
and the final partial row is dropped (no padding). Per token, ``doc_ids`` is the index of its document
within the row (0, 1, ...): the model builds a block-diagonal causal mask from it and restarts
positions at each document start. ``labels`` are the tokens themselves (the model shifts: the logits
at position t are scored against ``labels[t + 1]``), with ``labels[t + 1] = -100`` wherever
``doc_ids[t + 1] != doc_ids[t]`` so that no target crosses a document boundary. The separator is the
last token of its document, so the model still learns to emit it.

Near duplicates. MinHash over character 5-gram shingles (so Chinese, which has no spaces, works), and
LSH banding to find candidate pairs, each verified with the estimated Jaccard similarity; the first
occurrence is kept. Everything is vectorised in numpy: a 5-gram is hashed as a random linear
combination of its code points mod 2^64, and each of the ``num_perm`` permutations is the bijection
``x -> (a * x + b) mod 2^32`` with ``a`` odd (multiply-add hashing, Dietzfelbinger et al. 1997).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from glmwb.pretrain.errors import ConfigError
from glmwb.pretrain.ranges import Fraction, NonNegInt, PositiveInt

EOT_TOKEN = "<|endoftext|>"
IGNORE_INDEX = -100
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------
# 1. clean
# --------------------------------------------------------------------------------------------------

# Line-like separators become "\n" before control characters are stripped (\f separates pages in
# Gutenberg texts; U+2028 / U+2029 are Unicode's line and paragraph separators; U+0085 is NEL).
_NEWLINES = re.compile("\r\n?|[\v\f\x85\u2028\u2029]")
# C0 / C1 controls except \t and \n, plus invisible format characters that only hurt tokenization
# (zero-width space, BOM, soft hyphen). ZWJ / ZWNJ stay: emoji and several scripts need them.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\ufeff\xad]")
# The horizontal spaces left after that besides " " and "\t" (NBSP, ideographic space, thin spaces, ...).
_ODD_SPACE = re.compile("[\xa0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_SPACE_RUN = re.compile("  +")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_BLANK_LINES = re.compile(r"\n{3,}")


def _squeeze_inner(m: re.Match) -> str:
    """A run of spaces inside a line becomes one space; leading indentation is kept as it is."""
    start = m.start()
    return " " if start and not m.string[start - 1].isspace() else m.group()


def clean(text: str) -> str:
    """Unicode NFC; control characters removed (``\\n`` and ``\\t`` kept); whitespace normalised.

    Whitespace: CRLF / CR / form feed -> ``\\n``; exotic spaces (NBSP, U+3000, ...) -> " "; runs of
    spaces inside a line -> one space (leading indentation and tabs are kept); trailing spaces
    removed; three or more newlines -> one paragraph break (``\\n\\n``); the text stripped.
    """
    text = _NEWLINES.sub("\n", unicodedata.normalize("NFC", text))
    text = _CONTROL.sub("", text)
    text = _ODD_SPACE.sub(" ", text)
    text = _SPACE_RUN.sub(_squeeze_inner, text)
    text = _TRAILING_SPACE.sub("\n", text)
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


# --------------------------------------------------------------------------------------------------
# 2. quality filter
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FilterConfig:
    """Heuristic quality thresholds (in the spirit of Gopher / C4 rules, loose enough for prose and poetry).

    On ``../shared/data``'s Gutenberg books and Chinese poetry / Wikipedia these defaults reject
    nothing; they exist to drop boilerplate, tables of symbols, and fragments.
    """

    min_chars: NonNegInt = 32
    max_chars: PositiveInt = 200_000
    max_symbol_fraction: Fraction = 0.3  # non-letter, non-digit, non-space characters / non-space characters
    # characters in lines that repeat an earlier line / characters in all lines. Weighted by characters so
    # that a play's repeated speaker tags ("ROMEO:") do not count as boilerplate.
    max_duplicate_line_fraction: Fraction = 0.3
    min_unique_word_ratio: Fraction = 0.1  # distinct words / words (each CJK character counts as a word)
    # the unique-word rule only applies to texts with at least this many words
    min_words_for_ratio: NonNegInt = 20

    def __post_init__(self) -> None:
        if not 0 <= self.min_chars <= self.max_chars:
            raise ValueError(
                f"FilterConfig: need 0 <= min_chars <= max_chars, got {self.min_chars}, {self.max_chars}"
            )
        for name in ("max_symbol_fraction", "max_duplicate_line_fraction", "min_unique_word_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"FilterConfig: {name} must be in [0, 1], got {getattr(self, name)}")

    @classmethod
    def accept_all(cls) -> FilterConfig:
        """Thresholds that reject only empty texts (synthetic corpora whose every document is wanted)."""
        return cls(
            min_chars=1,
            max_chars=2**62,
            max_symbol_fraction=1.0,
            max_duplicate_line_fraction=1.0,
            min_unique_word_ratio=0.0,
        )


REJECT_REASONS = ("too_short", "too_long", "symbols", "duplicate_lines", "repetitive_words")

_WORD_OR_SPACE = re.compile(r"[\w\s]+")  # what is left after removing these (plus "_") are the symbols
_CJK_CHARS = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af"
_WORD = re.compile(rf"[{_CJK_CHARS}]|[^\W{_CJK_CHARS}]+")


def quality_filter(text: str, cfg: FilterConfig = FilterConfig()) -> str | None:
    """None if ``text`` passes, else the reason it is rejected (one of ``REJECT_REASONS``)."""
    n = len(text)
    if n < cfg.min_chars:
        return "too_short"
    if n > cfg.max_chars:
        return "too_long"
    non_space = sum(map(len, text.split()))
    symbols = len(_WORD_OR_SPACE.sub("", text)) + text.count("_")
    if symbols > cfg.max_symbol_fraction * max(1, non_space):
        return "symbols"
    seen, line_chars, dup_chars = set(), 0, 0
    for raw in text.split("\n"):
        line = raw.strip()
        line_chars += len(line)
        if line in seen:
            dup_chars += len(line)
        seen.add(line)
    if dup_chars > cfg.max_duplicate_line_fraction * line_chars:
        return "duplicate_lines"
    words = _WORD.findall(text.casefold())
    if len(words) >= cfg.min_words_for_ratio and len(set(words)) < cfg.min_unique_word_ratio * len(words):
        return "repetitive_words"
    return None


def filter_texts(texts: Iterable[str], cfg: FilterConfig = FilterConfig()) -> tuple[list[int], Counter]:
    """Indices of the texts that pass ``quality_filter`` and the number of rejections per reason."""
    kept, rejected = [], Counter()
    for i, text in enumerate(texts):
        reason = quality_filter(text, cfg)
        if reason is None:
            kept.append(i)
        else:
            rejected[reason] += 1
    return kept, rejected


# --------------------------------------------------------------------------------------------------
# 3. exact and near-duplicate removal
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DedupConfig:
    exact: bool = True
    near: bool = True
    num_perm: PositiveInt = 128  # MinHash permutations (signature length)
    shingle_size: PositiveInt = 5  # characters per shingle
    threshold: Fraction = 0.8  # Jaccard similarity at or above which a later document is a near duplicate
    bands: PositiveInt | None = None  # LSH bands; None = chosen from num_perm and threshold (see lsh_params)
    seed: NonNegInt = 0  # of the hash functions
    # shingles hashed per numpy block: chunk x num_perm x 4 bytes (4 MiB) stays in cache
    chunk_shingles: PositiveInt = 8192

    def __post_init__(self) -> None:
        if self.num_perm < 1 or self.shingle_size < 1 or self.chunk_shingles < 1:
            raise ValueError("DedupConfig: num_perm, shingle_size and chunk_shingles must be >= 1")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"DedupConfig: threshold must be in (0, 1], got {self.threshold}")
        if self.bands is not None and not 1 <= self.bands <= self.num_perm:
            raise ValueError(f"DedupConfig: bands must be in [1, num_perm={self.num_perm}], got {self.bands}")


_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz
_WS_RUN = re.compile(r"\s+")


def dedup_key(text: str) -> str:
    """The text as compared by dedup: case-folded, every whitespace run one space."""
    return _WS_RUN.sub(" ", text.casefold()).strip()


def exact_dedup(texts: Sequence[str]) -> list[int]:
    """Indices of the first occurrence of each text (compared by a 128-bit hash of ``dedup_key``)."""
    seen: set[bytes] = set()
    kept = []
    for i, text in enumerate(texts):
        digest = hashlib.blake2b(dedup_key(text).encode("utf-8"), digest_size=16).digest()
        if digest not in seen:
            seen.add(digest)
            kept.append(i)
    return kept


def _hash_params(cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng([cfg.seed, 0x5EED])
    gram_mult = rng.integers(0, 2**64, size=cfg.shingle_size, dtype=np.uint64) | np.uint64(1)
    perm_a = rng.integers(0, 2**32, size=cfg.num_perm, dtype=np.uint32) | np.uint32(1)  # odd: a bijection
    perm_b = rng.integers(0, 2**32, size=cfg.num_perm, dtype=np.uint32)
    return gram_mult, perm_a, perm_b


def shingles(text: str, k: int = 5) -> set[str]:
    """The set of character k-grams of ``dedup_key(text)`` (the whole key if shorter than k)."""
    key = dedup_key(text)
    return {key[i : i + k] for i in range(max(1, len(key) - k + 1))}


def minhash_signatures(
    texts: Sequence[str], cfg: DedupConfig = DedupConfig(), show_progress: bool = False
) -> np.ndarray:
    """MinHash signatures, (len(texts), num_perm) uint32, of the character shingles of ``dedup_key``.

    Shingle hash: ``x = (sum_j c[i + j] * m_j mod 2^64) >> 32`` over the k code points of the window.
    Permutation p: ``h_p(x) = (a_p * x + b_p) mod 2^32`` (a_p odd, so h_p is a bijection on 32 bits);
    ``sig[d, p] = min over shingles x of d of h_p(x)``. ``P(sig_A[p] == sig_B[p]) ~= Jaccard(A, B)``.
    Documents are processed in blocks of about ``chunk_shingles`` shingles: the windows of all
    documents in a block are hashed at once, and ``np.minimum.reduceat`` takes the per-document minima.
    """
    k, chunk = cfg.shingle_size, cfg.chunk_shingles
    gram_mult, perm_a, perm_b = _hash_params(cfg)
    # Pad with NULs (never in cleaned text) so that every document has at least one shingle.
    keys = [key.ljust(k, "\0") for key in map(dedup_key, texts)]
    sigs = np.empty((len(keys), cfg.num_perm), dtype=np.uint32)
    bar = tqdm(total=len(keys), desc="minhash", unit="doc", disable=not show_progress)
    lo = 0
    while lo < len(keys):
        hi, total = lo + 1, len(keys[lo]) - k + 1
        while hi < len(keys) and total + len(keys[hi]) - k + 1 <= chunk:
            total += len(keys[hi]) - k + 1
            hi += 1
        sigs[lo:hi] = _minhash_block(keys[lo:hi], k, chunk, gram_mult, perm_a, perm_b)
        bar.update(hi - lo)
        lo = hi
    bar.close()
    return sigs


def _minhash_block(keys: list[str], k: int, chunk: int, gram_mult, perm_a, perm_b) -> np.ndarray:
    codes = np.frombuffer("".join(keys).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    lengths = np.fromiter(map(len, keys), dtype=np.int64, count=len(keys))
    n_windows = len(codes) - k + 1
    grams = codes[:n_windows] * gram_mult[0]
    for j in range(1, k):
        grams += codes[j : j + n_windows] * gram_mult[j]
    # A window starting at p is valid unless a document boundary e lies in (p, p + k - 1]:
    # every document but the last leaves exactly k - 1 invalid windows before its end.
    valid = np.ones(n_windows, dtype=bool)
    ends = np.cumsum(lengths)[:-1]
    valid[(ends[:, None] - np.arange(1, k)[None, :]).ravel()] = False
    x = (grams[valid] >> np.uint64(32)).astype(np.uint32)
    counts = lengths - k + 1  # shingles per document, each >= 1
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    # (num_perm, n_shingles) layout: numpy reduces contiguous rows ~10x faster than strided columns.
    if len(keys) > 1 or len(x) <= chunk:
        hashed = np.multiply.outer(perm_a, x)  # wraps mod 2^32
        hashed += perm_b[:, None]
        return np.minimum.reduceat(hashed, starts, axis=1).T
    sig = np.full(len(perm_a), np.iinfo(np.uint32).max, dtype=np.uint32)  # one long document, in pieces
    for s in range(0, len(x), chunk):
        hashed = np.multiply.outer(perm_a, x[s : s + chunk])
        hashed += perm_b[:, None]
        np.minimum(sig, hashed.min(axis=1), out=sig)
    return sig[None, :]


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray | float:
    """Fraction of equal MinHash values: the unbiased estimate of the Jaccard similarity."""
    return np.mean(np.asarray(sig_a) == np.asarray(sig_b), axis=-1)


@functools.lru_cache(maxsize=64)
def lsh_params(num_perm: int, threshold: float, fp_weight: float = 0.1) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising ``fp_weight * FP + (1 - fp_weight) * FN``, the
    areas under the LSH S-curve ``P(candidate | s) = 1 - (1 - s^rows)^bands`` below and above ``threshold``.

    Every candidate pair is verified with its estimated Jaccard, so a false positive costs one vector
    comparison while a false negative is a duplicate left in: recall is weighted 9:1. For 128 / 0.8
    that gives 14 x 9: P(candidate) = 0.03 at s = 0.5, 0.87 at 0.8, 0.975 at 0.85, 0.999 at 0.9.
    """
    best, best_err = (1, num_perm), float("inf")
    lo, hi = np.linspace(0.0, threshold, 201), np.linspace(threshold, 1.0, 201)
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp = _trapezoid(1 - (1 - lo**rows) ** bands, lo)
            fn = _trapezoid((1 - hi**rows) ** bands, hi)
            err = fp_weight * fp + (1 - fp_weight) * fn
            if err < best_err:
                best, best_err = (bands, rows), err
    return best


def near_dedup(
    texts: Sequence[str], cfg: DedupConfig = DedupConfig(), show_progress: bool = False
) -> list[int]:
    """Indices of the texts to keep: each text whose estimated Jaccard similarity with an earlier kept text
    reaches ``cfg.threshold`` is dropped. Candidates come from LSH buckets (documents sharing all ``rows``
    signature values of some band); only candidates are compared, against kept documents only."""
    if not texts:
        return []
    sigs = minhash_signatures(texts, cfg, show_progress=show_progress)
    bands, rows = _bands_rows(cfg)
    # One 64-bit key per (document, band): a random linear combination of the band's signature values.
    rng = np.random.default_rng([cfg.seed, 0xBA5D])
    mult = rng.integers(0, 2**64, size=rows, dtype=np.uint64) | np.uint64(1)
    band_sigs = sigs[:, : bands * rows].astype(np.uint64).reshape(len(texts), bands, rows)
    band_keys = (band_sigs * mult).sum(axis=2).tolist()  # (D, bands), wraps mod 2^64
    buckets: list[dict[int, list[int]]] = [{} for _ in range(bands)]
    kept = []
    for d, keys in enumerate(band_keys):
        candidates = {c for b, key in enumerate(keys) for c in buckets[b].get(key, ())}
        if candidates:
            cand = np.fromiter(candidates, dtype=np.int64, count=len(candidates))
            if np.max(estimate_jaccard(sigs[cand], sigs[d])) >= cfg.threshold:
                continue
        kept.append(d)
        for b, key in enumerate(keys):
            buckets[b].setdefault(key, []).append(d)
    return kept


def _bands_rows(cfg: DedupConfig) -> tuple[int, int]:
    if cfg.bands is None:
        return lsh_params(cfg.num_perm, cfg.threshold)
    return cfg.bands, cfg.num_perm // cfg.bands


# --------------------------------------------------------------------------------------------------
# 4. tokenize, 5. pack
# --------------------------------------------------------------------------------------------------


def eot_id(tokenizer) -> int:
    """The id of ``<|endoftext|>``; an error if the tokenizer does not know the token."""
    tid = tokenizer.convert_tokens_to_ids(EOT_TOKEN)
    if tid is None or (tokenizer.unk_token_id is not None and tid == tokenizer.unk_token_id):
        raise ValueError(
            f"the tokenizer has no {EOT_TOKEN} token (the document separator); add it as a special token"
        )
    return int(tid)


def tokenize(
    texts: Sequence[str], tokenizer, batch_size: int = 1000, show_progress: bool = False
) -> list[np.ndarray]:
    """Token ids (int32) of each text, ``add_special_tokens=False``, with ``<|endoftext|>`` appended."""
    sep = eot_id(tokenizer)
    out = []
    for start in tqdm(
        range(0, len(texts), batch_size), desc="tokenize", unit="batch", disable=not show_progress
    ):
        batch = list(texts[start : start + batch_size])
        enc = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)
        for ids in enc["input_ids"]:
            arr = np.empty(len(ids) + 1, dtype=np.int32)
            arr[:-1] = ids
            arr[-1] = sep
            out.append(arr)
    return out


def make_labels(input_ids: np.ndarray, doc_ids: np.ndarray) -> np.ndarray:
    """Labels (int64) for packed rows: the tokens, with -100 at t where doc_ids[t] != doc_ids[t - 1].

    The model scores logits[:, t] against labels[:, t + 1]; masking the first token of each document
    that follows another one in the row means no target crosses a document boundary.
    """
    labels = np.asarray(input_ids).astype(np.int64, copy=True)
    doc_ids = np.asarray(doc_ids)
    labels[..., 1:][doc_ids[..., 1:] != doc_ids[..., :-1]] = IGNORE_INDEX
    return labels


def pack(docs: Sequence[np.ndarray | Sequence[int]], seq_len: int) -> dict[str, np.ndarray]:
    """Concatenate the documents (separators already appended) and cut into rows of ``seq_len`` tokens.

    Returns ``input_ids`` (R, seq_len) int32, ``doc_ids`` (R, seq_len) int32 (index of each token's
    document within its row, from 0; a document continued from the previous row is document 0),
    ``labels`` (R, seq_len) int64 (see ``make_labels``) and ``dropped_tokens`` (the final partial row).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    flat = np.concatenate([np.asarray(d, dtype=np.int32) for d in docs] or [np.empty(0, np.int32)])
    doc_index = np.repeat(np.arange(len(docs), dtype=np.int64), lengths)
    n_rows = len(flat) // seq_len
    input_ids = flat[: n_rows * seq_len].reshape(n_rows, seq_len)
    global_doc = doc_index[: n_rows * seq_len].reshape(n_rows, seq_len)
    doc_ids = (global_doc - global_doc[:, :1]).astype(np.int32)
    return {
        "input_ids": input_ids,
        "doc_ids": doc_ids,
        "labels": make_labels(input_ids, doc_ids),
        "dropped_tokens": len(flat) - n_rows * seq_len,
    }


# --------------------------------------------------------------------------------------------------
# 6. storage, dataset, resumable batches
# --------------------------------------------------------------------------------------------------


def tokenizer_hash(tokenizer) -> str:
    """A fingerprint of the tokenizer (its full serialised form: vocabulary, merges, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def save_packed(
    folder: str | Path, input_ids: np.ndarray, doc_ids: np.ndarray, meta: dict[str, Any] | None = None
):
    """Write ``tokens.npy``, ``doc_ids.npy`` and ``meta.json`` (last: its presence marks a complete folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    input_ids, doc_ids = np.asarray(input_ids, dtype=np.int32), np.asarray(doc_ids, dtype=np.int32)
    if input_ids.ndim != 2 or input_ids.shape != doc_ids.shape:
        raise ValueError(
            f"input_ids and doc_ids must be equal 2-D shapes, got {input_ids.shape}, {doc_ids.shape}"
        )
    (folder / "meta.json").unlink(missing_ok=True)
    np.save(folder / "tokens.npy", input_ids)
    np.save(folder / "doc_ids.npy", doc_ids)
    full = {
        "format": FORMAT_VERSION,
        **(meta or {}),
        "rows": int(input_ids.shape[0]),
        "seq_len": int(input_ids.shape[1]),
        "tokens": int(input_ids.size),
        "dtype": "int32",
    }
    tmp = folder / "meta.json.tmp"
    tmp.write_text(json.dumps(full, indent=2, ensure_ascii=False))
    os.replace(tmp, folder / "meta.json")


class PackedDataset(torch.utils.data.Dataset):
    """Packed rows; item i is ``{input_ids, doc_ids, labels}`` as int64 tensors of shape (seq_len,)."""

    def __init__(self, tokens: np.ndarray, doc_ids: np.ndarray, meta: dict[str, Any] | None = None):
        if tokens.ndim != 2 or tokens.shape != doc_ids.shape:
            raise ValueError(
                f"tokens and doc_ids must be equal 2-D shapes, got {tokens.shape}, {doc_ids.shape}"
            )
        self.tokens, self.doc_ids = tokens, doc_ids
        self.meta = dict(meta or {})
        self.seq_len = int(tokens.shape[1])

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.batch(np.array([i])).items()}

    def batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """Rows ``indices`` stacked: input_ids, doc_ids, labels, each (len(indices), seq_len) int64."""
        input_ids, doc_ids = np.asarray(self.tokens[indices]), np.asarray(self.doc_ids[indices])
        return {
            "input_ids": torch.from_numpy(input_ids.astype(np.int64)),
            "doc_ids": torch.from_numpy(doc_ids.astype(np.int64)),
            "labels": torch.from_numpy(make_labels(input_ids, doc_ids)),
        }


def load_packed(folder: str | Path) -> PackedDataset:
    """The ``PackedDataset`` in ``folder`` (``save_packed``'s layout), memory-mapped read-only."""
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder}: no meta.json (not a packed dataset, or an interrupted build)")
    meta = json.loads(meta_path.read_text())
    tokens = np.load(folder / "tokens.npy", mmap_mode="r")
    doc_ids = np.load(folder / "doc_ids.npy", mmap_mode="r")
    if tokens.shape != (meta["rows"], meta["seq_len"]):
        raise ValueError(
            f"{folder}: tokens.npy has shape {tokens.shape}, meta.json says ({meta['rows']}, {meta['seq_len']})"
        )
    return PackedDataset(tokens, doc_ids, meta)


class BatchIterator:
    """Endless, deterministic, resumable batches of rows: epoch e visits the rows in the order of a
    permutation drawn from ``np.random.default_rng((seed, e))`` (``shuffle=False``: in order).

    Each epoch yields ``len(dataset) // batch_size`` full batches (the remainder is skipped for that
    epoch; a dataset smaller than one batch yields it whole). ``position`` counts the rows consumed in
    the current epoch, so ``state_dict()`` taken after k batches and loaded into a new iterator gives
    exactly the batches an uninterrupted run would have seen next.
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        seed: int = 0,
        epoch: int = 0,
        position: int = 0,
        shuffle: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(dataset) == 0:
            raise ValueError(
                "BatchIterator: the dataset has no rows (too few tokens for one row of seq_len?)"
            )
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.seed, self.epoch, self.position = seed, epoch, position
        self._order_epoch, self._order = None, None

    @property
    def rows_per_epoch(self) -> int:
        n = len(self.dataset)
        return n if n < self.batch_size else n - n % self.batch_size

    def order(self, epoch: int) -> np.ndarray:
        """The row order of ``epoch``."""
        if self._order_epoch != epoch:
            n = len(self.dataset)
            self._order = (
                np.random.default_rng((self.seed, epoch)).permutation(n) if self.shuffle else np.arange(n)
            )
            self._order_epoch = epoch
        return self._order

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.position >= self.rows_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        end = min(self.position + self.batch_size, self.rows_per_epoch)
        indices = self.order(self.epoch)[self.position : end]
        self.position = end
        if hasattr(self.dataset, "batch"):
            return self.dataset.batch(indices)
        items = [self.dataset[int(i)] for i in indices]
        return {k: torch.stack([item[k] for item in items]) for k in items[0]}

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "shuffle": self.shuffle,
            "num_rows": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_rows", len(self.dataset)) != len(self.dataset):
            raise ValueError(
                f"BatchIterator: the saved state is for {state['num_rows']} rows, this dataset has "
                f"{len(self.dataset)}; the data changed, so the saved position means nothing here"
            )
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        self._order_epoch = None


# --------------------------------------------------------------------------------------------------
# 7. build_dataset, unigram baseline
# --------------------------------------------------------------------------------------------------


def split_value(text: str) -> float:
    """A deterministic uniform value in [0, 1) from the text alone (same document -> same split)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"glmwb-split").digest()
    return int.from_bytes(digest, "little") / 2**64


def split_heldout(
    docs: Sequence[str], num_tokens: Sequence[int], heldout_fraction: float, min_tokens: int = 0
) -> np.ndarray:
    """Which documents are held out (bool per document): those with ``split_value < heldout_fraction``, so
    a document's split depends on its text alone and is the same in every corpus that contains it. When
    ``heldout_fraction > 0`` and those hold fewer than ``min_tokens`` tokens, the documents with the
    next-lowest values join until they do (a held-out split too small for one packed row is useless)."""
    values = np.array([split_value(d) for d in docs])
    heldout = values < heldout_fraction
    if heldout_fraction > 0:
        total = int(np.sum(np.asarray(num_tokens)[heldout]))
        for i in np.argsort(values, kind="stable")[int(heldout.sum()) :]:
            if total >= min_tokens:
                break
            heldout[i], total = True, total + num_tokens[i]
    return heldout


def build_dataset(
    texts: Iterable[str],
    tokenizer,
    seq_len: int,
    out_dir: str | Path,
    heldout_fraction: float = 0.02,
    filter_cfg: FilterConfig = FilterConfig(),
    dedup_cfg: DedupConfig = DedupConfig(),
    seed: int = 0,
    show_progress: bool = True,
) -> dict[str, Any]:
    """clean → filter → exact dedup → near dedup → split by document → tokenize → pack → save.

    The held-out split is chosen by a hash of each document's text (``split_heldout``: a document is
    never in both, and the split does not depend on ``seed``), topped up to at least one row of
    tokens. ``seed`` shuffles the order of documents before packing. Returns the statistics also
    written to ``out_dir/stats.json``.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    out_dir = Path(out_dir)
    for stale in (out_dir / "train" / "meta.json", out_dir / "heldout" / "meta.json", out_dir / "stats.json"):
        stale.unlink(missing_ok=True)  # an interrupted rebuild must not look complete
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        seconds[stage] = round(now - t0, 3)
        t0 = now

    docs = [clean(t) for t in tqdm(texts, desc="clean", unit="doc", disable=not show_progress)]
    docs_in = len(docs)
    lap("clean")
    kept, rejected = filter_texts(docs, filter_cfg)
    docs = [docs[i] for i in kept]
    lap("filter")
    n = len(docs)
    if dedup_cfg.exact:
        docs = [docs[i] for i in exact_dedup(docs)]
    exact_dups, n = n - len(docs), len(docs)
    lap("exact_dedup")
    if dedup_cfg.near:
        docs = [docs[i] for i in near_dedup(docs, dedup_cfg, show_progress=show_progress)]
    near_dups = n - len(docs)
    lap("near_dedup")

    tokens = tokenize(docs, tokenizer, show_progress=show_progress)
    lap("tokenize")
    heldout = split_heldout(docs, [len(t) for t in tokens], heldout_fraction, min_tokens=seq_len)
    order = np.random.default_rng(seed).permutation(len(docs)).tolist()
    splits = {"train": [i for i in order if not heldout[i]], "heldout": [i for i in order if heldout[i]]}
    lap("split")

    meta = {
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "vocab_size": len(tokenizer),
        "eot_id": eot_id(tokenizer),
    }
    stats: dict[str, Any] = {
        "docs_in": docs_in,
        "rejected": {reason: rejected.get(reason, 0) for reason in REJECT_REASONS},
        "exact_duplicates": exact_dups,
        "near_duplicates": near_dups,
        "docs_kept": len(docs),
        "docs": {},
        "tokens": {},
        "rows": {},
        "dropped_tokens": {},
        "seq_len": seq_len,
        **meta,
        "filter": asdict(filter_cfg),
        "dedup": {**asdict(dedup_cfg), "bands_rows": list(_bands_rows(dedup_cfg))},
        "seed": seed,
    }
    for name in ("heldout", "train"):  # train last: its meta.json marks the whole build complete
        doc_index = splits[name]
        packed = pack([tokens[i] for i in doc_index], seq_len)
        n_rows, split_tokens = len(packed["input_ids"]), sum(len(tokens[i]) for i in doc_index)
        if name == "train" and n_rows == 0:
            raise ValueError(
                f"build_dataset: the training split has {split_tokens} tokens, fewer than one row of "
                f"seq_len={seq_len}; give more text or a shorter seq_len"
            )
        save_packed(out_dir / name, packed["input_ids"], packed["doc_ids"], {**meta, "docs": len(doc_index)})
        stats["docs"][name], stats["tokens"][name] = len(doc_index), int(split_tokens)
        stats["rows"][name], stats["dropped_tokens"][name] = n_rows, int(packed["dropped_tokens"])
    lap("pack_save")
    stats["seconds"] = seconds
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False))
    return stats


def _flat_tokens(data) -> np.ndarray:
    if isinstance(data, PackedDataset):
        return np.asarray(data.tokens).ravel()
    return np.asarray(data).ravel()


def _target_tokens(data) -> np.ndarray:
    """The tokens a model is scored on: packed rows' labels[:, 1:] that are not -100; else all tokens."""
    if hasattr(data, "rows"):  # stream.ShardedTokens
        tokens, doc_ids = data.rows(np.arange(len(data)))
        return tokens[:, 1:][doc_ids[:, 1:] == doc_ids[:, :-1]]
    if isinstance(data, PackedDataset):
        tokens, doc_ids = np.asarray(data.tokens), np.asarray(data.doc_ids)
        return tokens[:, 1:][doc_ids[:, 1:] == doc_ids[:, :-1]]
    return np.asarray(data).ravel()


def unigram_entropy(train, heldout=None, vocab_size: int | None = None) -> float:
    """Cross-entropy (nats/token) of an add-one-smoothed unigram model fitted on ``train`` and evaluated
    on ``heldout`` (on ``train`` itself when there is no held-out data): the loss a model that ignores
    context would reach, the baseline a pretraining loss must beat.

    ``p(v) = (count_train(v) + 1) / (N_train + V)``; returns ``-mean over held-out targets of log p``.
    ``train`` / ``heldout``: token arrays of any shape or ``PackedDataset`` s (scored on their targets,
    as the model is). ``unigram_entropy(tokens, vocab_size)`` also works.
    """
    if vocab_size is None and isinstance(heldout, int | np.integer):
        heldout, vocab_size = None, int(heldout)
    if vocab_size is None:
        raise ValueError("unigram_entropy: vocab_size is required")
    eval_tokens = _target_tokens(heldout if heldout is not None and len(heldout) else train)
    if len(eval_tokens) == 0:
        raise ValueError("unigram_entropy: no tokens to evaluate on")
    if hasattr(train, "token_counts"):  # stream.ShardedTokens: counted shard by shard
        counts = train.token_counts(vocab_size).astype(np.float64)
    else:
        train_tokens = _flat_tokens(train)
        if train_tokens.size and int(train_tokens.max()) >= vocab_size:
            raise ValueError(
                f"unigram_entropy: token id {int(train_tokens.max())} >= vocab_size {vocab_size}"
            )
        counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64)
    log_p = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)
    return float(-log_p[eval_tokens].mean())


# --------------------------------------------------------------------------------------------------
# 8. readers
# --------------------------------------------------------------------------------------------------


class DataFormatError(ConfigError):
    """A record that cannot be read; the message names the file, the line and what is wrong."""


_READABLE = (".jsonl", ".jsonl.gz", ".txt", ".txt.gz")


def _files(path_or_paths: str | Path | Iterable[str | Path]) -> list[Path]:
    paths = [path_or_paths] if isinstance(path_or_paths, str | os.PathLike) else list(path_or_paths)
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(_READABLE))
        elif not p.exists():
            raise FileNotFoundError(f"read_texts: no such file or folder: {p}")
        elif not p.name.endswith(_READABLE):
            raise DataFormatError(f"{p}: unsupported file type (expected one of {', '.join(_READABLE)})")
        else:
            files.append(p)
    return files


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


def iter_texts(path_or_paths: str | Path | Iterable[str | Path], field: str = "text") -> Iterator[str]:
    """The documents in JSONL files (one per line, from ``field``; ``.jsonl.gz`` too) and plain text files
    (``.txt`` / ``.txt.gz``: one document per file). Folders are searched recursively for those types.
    Blank JSONL lines are skipped; any other unreadable line raises ``DataFormatError`` naming the file
    and line number."""
    for path in _files(path_or_paths):
        with _open_text(path) as f:
            if path.name.endswith((".txt", ".txt.gz")):
                yield f.read()
                continue
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataFormatError(
                        f"{path}, line {lineno}: invalid JSON ({e.msg} at column {e.colno})"
                    ) from None
                if not isinstance(record, dict):
                    raise DataFormatError(
                        f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}"
                    )
                if field not in record:
                    raise DataFormatError(
                        f"{path}, line {lineno}: record has no {field!r} field (fields: {', '.join(map(repr, record)) or 'none'})"
                    )
                if not isinstance(record[field], str):
                    raise DataFormatError(
                        f"{path}, line {lineno}: field {field!r} must be a string, got {type(record[field]).__name__}"
                    )
                yield record[field]


def read_texts(path_or_paths: str | Path | Iterable[str | Path], field: str = "text") -> list[str]:
    """All documents of ``iter_texts`` as a list."""
    return list(iter_texts(path_or_paths, field))
