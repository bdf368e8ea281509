"""Tests for the pretraining data pipeline (pretrain/data.py)."""

from __future__ import annotations

import gzip
import itertools
import json
import random
import time
import unicodedata
from dataclasses import FrozenInstanceError
from pathlib import Path

import numpy as np
import pytest
import torch

from glmwb.pretrain.data import (
    IGNORE_INDEX,
    BatchIterator,
    DataFormatError,
    DedupConfig,
    FilterConfig,
    PackedDataset,
    build_dataset,
    clean,
    estimate_jaccard,
    exact_dedup,
    filter_texts,
    load_packed,
    lsh_params,
    make_labels,
    minhash_signatures,
    near_dedup,
    pack,
    quality_filter,
    read_texts,
    save_packed,
    shingles,
    split_heldout,
    tokenize,
    unigram_entropy,
)
from tests.shared_data import SHARED_DATA

DATA = SHARED_DATA
EN = DATA / "pretrain_en" / "pretrain_en.jsonl"
ZH = DATA / "pretrain_zh" / "pretrain_zh.jsonl"


def first_texts(path: Path, n: int) -> list[str]:
    if not path.is_file():  # the real sample lives beside the checkout (CI has it); a lone clone does not
        pytest.skip(f"real data file {path} is absent (../shared/data beside the checkout)")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in itertools.islice(f, n)]


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


@pytest.fixture(scope="module")
def en_texts() -> list[str]:
    return first_texts(EN, 300)


@pytest.fixture(scope="module")
def zh_texts() -> list[str]:
    return first_texts(ZH, 300)


@pytest.fixture(scope="module")
def tokenizer(en_texts, zh_texts):
    from glmwb.pretrain.tokenizer import train_tokenizer

    return train_tokenizer(en_texts + zh_texts, vocab_size=1024, show_progress=False)


# ------------------------------------------------------------------------------------------------ clean


def test_clean_normalises_unicode_controls_and_whitespace():
    nfd = unicodedata.normalize("NFD", "café")
    assert len(nfd) == 5 and clean(nfd) == "café"
    assert clean("a\x00b\x07c\x1bd\u200be\ufeff") == "abcde"  # control and invisible characters
    assert clean("line one\r\nline two\rline three") == "line one\nline two\nline three"
    assert clean("col1\tcol2") == "col1\tcol2"  # tabs are kept
    assert clean("many    spaces\u00a0\u00a0and\u3000nbsp") == "many spaces and nbsp"
    assert clean("trailing   \nnext") == "trailing\nnext"
    assert clean("para one\n\n\n\n\npara two") == "para one\n\npara two"  # one paragraph break kept
    assert clean("para one\n  \t \n\npara two") == "para one\n\npara two"  # whitespace-only lines are blank
    assert clean("def f():\n    return 1") == "def f():\n    return 1"  # indentation is kept
    assert clean("  \n  padded  \n\n ") == "padded"
    assert clean("中文\u3000\u3000段落。") == "中文 段落。"
    assert clean("") == ""


# ------------------------------------------------------------------------------------------------ filter


def test_quality_filter_each_reason():
    cfg = FilterConfig(min_chars=20, max_chars=2000)
    prose = (
        "It was the best of times, it was the worst of times, it was the age of wisdom, "
        "it was the age of foolishness, it was the epoch of belief, it was the epoch of incredulity."
    )
    assert quality_filter(prose, cfg) is None
    assert quality_filter("too short", cfg) == "too_short"
    assert quality_filter(prose * 30, cfg) == "too_long"
    assert quality_filter("#### $$$ %%% &&& *** @@@ !!! ??? ((( ))) +++ === ~~~", cfg) == "symbols"
    boilerplate = "\n".join(["Click here to subscribe to our newsletter!"] * 5 + ["A real sentence at last."])
    assert quality_filter(boilerplate, cfg) == "duplicate_lines"
    spam = " ".join(["buy cheap pills now"] * 40)
    assert quality_filter(spam, cfg) == "repetitive_words"
    # Chinese: each CJK character is a word; a repeated phrase is repetitive, real poetry is not.
    assert quality_filter("买买买便宜货" * 60, cfg) == "repetitive_words"
    assert (
        quality_filter("床前明月光，疑是地上霜。举头望明月，低头思故乡。白日依山尽，黄河入海流。", cfg)
        is None
    )


def test_filter_texts_counts_reasons_and_config_is_frozen():
    cfg = FilterConfig(min_chars=10)
    kept, rejected = filter_texts(["short", "a perfectly reasonable sentence here.", "!!!!!!!!!!!!!!"], cfg)
    assert kept == [1]
    assert rejected == {"too_short": 1, "symbols": 1}
    with pytest.raises(FrozenInstanceError):
        cfg.min_chars = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="max_symbol_fraction"):
        FilterConfig(max_symbol_fraction=1.5)
    assert filter_texts(["x", "!!!", "a\na\na"], FilterConfig.accept_all()) == ([0, 1, 2], {})


def test_default_filter_keeps_real_prose_and_poetry(en_texts, zh_texts):
    docs = [clean(t) for t in en_texts + zh_texts]
    kept, rejected = filter_texts(docs)
    assert len(kept) >= 0.98 * len(docs), rejected


# ------------------------------------------------------------------------------------------------ dedup


def test_exact_dedup_keeps_first_occurrence():
    docs = ["The cat sat.", "A different doc.", "the  CAT sat.", "The cat sat.", "Another one."]
    assert exact_dedup(docs) == [0, 1, 4]  # case and whitespace differences are the same document


def test_near_duplicate_removed_and_distinct_doc_kept(en_texts):
    book = clean(en_texts[0])
    doc = book[:1000]
    words = doc.split(" ")
    words[len(words) // 2] = "elephant"  # one word changed
    near = " ".join(words)
    other = clean(en_texts[1])[:1000]  # a different passage of the same book
    assert near != doc and 0.8 < jaccard(doc, near) < 1.0 and jaccard(doc, other) < 0.3
    assert near_dedup([doc, other, near]) == [0, 1]
    assert near_dedup([near, doc, other]) == [0, 2]  # the first occurrence is the one kept


def test_near_duplicate_chinese(zh_texts):
    doc = clean(zh_texts[5])[:600]
    near = doc[:300] + "之" + doc[301:]  # one character changed
    other = clean(zh_texts[6])[:600]
    assert near_dedup([doc, near, other]) == [0, 2]


def test_minhash_estimates_jaccard(en_texts, zh_texts):
    en, zh = clean(en_texts[2]), clean(zh_texts[10])
    # Overlapping windows of the same text: true Jaccard from ~0.95 down to ~0.1.
    pairs = [(en[:1500], en[shift : shift + 1500]) for shift in (25, 200, 500, 900, 1200)]
    pairs += [(zh[:400], zh[shift : shift + 400]) for shift in (20, 150)] + [(en[:1500], zh[:400])]
    sigs_a = minhash_signatures([a for a, _ in pairs])
    sigs_b = minhash_signatures([b for _, b in pairs])
    assert sigs_a.shape == (len(pairs), 128) and sigs_a.dtype == np.uint32
    true = np.array([jaccard(a, b) for a, b in pairs])
    est = estimate_jaccard(sigs_a, sigs_b)
    assert true.max() > 0.9 and true.min() == 0.0 and ((true > 0.3) & (true < 0.7)).any()
    np.testing.assert_allclose(est, true, atol=0.1)
    assert np.all(minhash_signatures([en[:1500]]) == sigs_a[0])  # independent of the batch it is in


def test_minhash_blocks_do_not_change_signatures(en_texts):
    """Many documents per numpy block, one long document split over blocks: the same signatures."""
    docs = [clean(en_texts[3]), "tiny", clean(en_texts[4])[:300], "", clean(en_texts[5])[:50]]
    whole = minhash_signatures(docs, DedupConfig(chunk_shingles=1 << 20))
    np.testing.assert_array_equal(minhash_signatures(docs, DedupConfig(chunk_shingles=64)), whole)
    one_by_one = np.concatenate([minhash_signatures([d]) for d in docs])
    np.testing.assert_array_equal(one_by_one, whole)
    assert not np.array_equal(whole[0], whole[2])


def test_lsh_params_put_the_threshold_on_the_s_curve():
    bands, rows = lsh_params(128, 0.8)
    assert bands * rows <= 128

    def p_candidate(s: float) -> float:
        return 1 - (1 - s**rows) ** bands

    assert p_candidate(0.9) > 0.99 and p_candidate(0.5) < 0.05 and p_candidate(0.8) > 0.8


@pytest.mark.slow
def test_dedup_speed_20k_docs(en_texts):
    """20k documents of ~1 KB through exact + near dedup in under 30 s (2 CPU cores)."""
    pieces = [
        t[i : i + 1000] for t in map(clean, first_texts(EN, 2000)) for i in range(0, len(t) - 999, 1000)
    ]
    rng = random.Random(0)
    docs = [rng.choice(pieces) for _ in range(20_000)]
    docs = [d if rng.random() < 0.5 else d.replace(" the ", " a ", 1) for d in docs]
    start = time.perf_counter()
    kept = exact_dedup(docs)
    kept = near_dedup([docs[i] for i in kept])
    assert time.perf_counter() - start < 30
    assert len(kept) <= len(set(pieces))


# ------------------------------------------------------------------------------------------------ pack


def test_make_labels_masks_targets_across_documents():
    input_ids = np.array([[5, 6, 0, 7, 0, 8]])
    doc_ids = np.array([[0, 0, 0, 1, 1, 2]])
    assert make_labels(input_ids, doc_ids).tolist() == [[5, 6, 0, -100, 0, -100]]


def test_pack_rows_doc_ids_and_labels():
    rng = np.random.default_rng(0)
    seq_len, sep = 16, 0
    lengths = [3, 40, 1, 7, 16, 5, 2, 33, 9]  # some longer than a row, one exactly a row
    docs = [np.append(rng.integers(1, 100, n), sep).astype(np.int32) for n in lengths]
    packed = pack(docs, seq_len)
    ids, doc_ids, labels = packed["input_ids"], packed["doc_ids"], packed["labels"]
    flat = np.concatenate(docs)
    n_rows = len(flat) // seq_len
    assert ids.shape == doc_ids.shape == labels.shape == (n_rows, seq_len)
    assert ids.dtype == np.int32 and packed["dropped_tokens"] == len(flat) - n_rows * seq_len
    # the rows are the documents and their separators, concatenated and truncated to whole rows
    np.testing.assert_array_equal(ids.ravel(), flat[: n_rows * seq_len])
    # doc_ids: start at 0 in each row and step up by one exactly after each separator.
    assert (doc_ids[:, 0] == 0).all()
    steps = np.diff(doc_ids, axis=1)
    np.testing.assert_array_equal(steps, (ids[:, :-1] == sep).astype(steps.dtype))
    # labels: the token itself, except -100 where a target would cross into another document.
    for r in range(n_rows):
        for t in range(1, seq_len):
            crosses = doc_ids[r, t] != doc_ids[r, t - 1]
            assert labels[r, t] == (IGNORE_INDEX if crosses else ids[r, t])
    assert (labels[:, 0] == ids[:, 0]).all()
    # each separator stays a target of its own document (the model learns to emit it)
    sep_pos = np.argwhere(ids[:, 1:] == sep) + [0, 1]
    assert all(labels[r, t] == sep for r, t in sep_pos)


def test_pack_empty_and_too_short():
    assert pack([], 8)["input_ids"].shape == (0, 8)
    assert pack([np.arange(5)], 8)["input_ids"].shape == (0, 8)


# ------------------------------------------------------------------------------------------------ storage / batches


def make_dataset(n_rows: int = 23, seq_len: int = 8) -> PackedDataset:
    rng = np.random.default_rng(1)
    docs = [np.append(rng.integers(1, 50, rng.integers(1, 12)), 0) for _ in range(n_rows * 3)]
    packed = pack(docs, seq_len)
    return PackedDataset(packed["input_ids"][:n_rows], packed["doc_ids"][:n_rows], {"seq_len": seq_len})


def test_save_load_roundtrip(tmp_path):
    ds = make_dataset()
    save_packed(tmp_path / "train", ds.tokens, ds.doc_ids, {"tokenizer_hash": "abc"})
    loaded = load_packed(tmp_path / "train")
    assert len(loaded) == len(ds) and loaded.seq_len == 8
    assert loaded.meta["tokenizer_hash"] == "abc" and loaded.meta["rows"] == len(ds)
    assert isinstance(loaded.tokens, np.memmap)
    item = loaded[3]
    assert item["input_ids"].dtype == torch.int64 and item["input_ids"].shape == (8,)
    np.testing.assert_array_equal(item["input_ids"].numpy(), ds.tokens[3])
    np.testing.assert_array_equal(item["labels"].numpy(), make_labels(ds.tokens[3:4], ds.doc_ids[3:4])[0])
    with pytest.raises(FileNotFoundError, match="meta.json"):
        load_packed(tmp_path / "missing")


def take(iterator, n: int) -> list[torch.Tensor]:
    return [next(iterator)["input_ids"] for _ in range(n)]


def test_batch_iterator_resume_matches_uninterrupted():
    ds = make_dataset(n_rows=23)
    batch_size = 4  # 5 batches per epoch, 3 rows skipped per epoch
    reference = take(BatchIterator(ds, batch_size, seed=7), 17)  # more than three epochs
    for k in (0, 3, 5, 9):
        first = BatchIterator(ds, batch_size, seed=7)
        consumed = take(first, k)
        state = first.state_dict()
        resumed = BatchIterator(ds, batch_size, seed=0)
        resumed.load_state_dict(json.loads(json.dumps(state)))  # the state survives JSON
        rest = take(resumed, 17 - k)
        for a, b in zip(consumed + rest, reference, strict=True):
            assert torch.equal(a, b)
    # same as constructing from the saved fields
    it = BatchIterator(ds, batch_size, seed=7)
    take(it, 7)
    s = it.state_dict()
    again = BatchIterator(ds, batch_size, seed=s["seed"], epoch=s["epoch"], position=s["position"])
    assert all(torch.equal(a, b) for a, b in zip(take(again, 10), reference[7:], strict=True))


def test_batch_iterator_epochs_shuffle_and_cover():
    ds = make_dataset(n_rows=20)
    it = BatchIterator(ds, 5, seed=3)
    epoch0 = torch.cat(take(it, 4))
    epoch1 = torch.cat(take(it, 4))
    assert it.state_dict()["epoch"] == 1
    rows = {tuple(r) for r in ds.tokens.tolist()}
    assert {tuple(r) for r in epoch0.tolist()} == rows == {tuple(r) for r in epoch1.tolist()}
    assert not torch.equal(epoch0, epoch1)  # reshuffled each epoch
    small = torch.cat(take(BatchIterator(ds, 32, shuffle=False), 2))  # fewer rows than a batch: all of them
    np.testing.assert_array_equal(small.numpy(), np.concatenate([ds.tokens, ds.tokens]))
    in_order = torch.cat(take(BatchIterator(ds, 5, shuffle=False), 4))
    np.testing.assert_array_equal(in_order.numpy(), ds.tokens)
    batch = next(BatchIterator(ds, 5))
    assert set(batch) == {"input_ids", "doc_ids", "labels"} and all(
        v.dtype == torch.int64 for v in batch.values()
    )
    assert batch["input_ids"].shape == (5, 8)


def test_batch_iterator_rejects_state_of_other_data():
    it = BatchIterator(make_dataset(n_rows=20), 4)
    with pytest.raises(ValueError, match="rows"):
        it.load_state_dict({**it.state_dict(), "num_rows": 99})
    with pytest.raises(ValueError, match="no rows"):
        BatchIterator(make_dataset(n_rows=0), 4)


# ------------------------------------------------------------------------------------------------ unigram


def test_unigram_entropy():
    vocab = 50
    uniform = np.tile(np.arange(vocab), 100)
    assert unigram_entropy(uniform, uniform, vocab) == pytest.approx(np.log(vocab))
    assert unigram_entropy(uniform, vocab) == pytest.approx(np.log(vocab))  # (tokens, vocab_size) form
    skewed = np.array([0] * 900 + [1] * 100)
    p0, p1 = 901 / (1000 + vocab), 101 / (1000 + vocab)  # add-one smoothing
    assert unigram_entropy(skewed, skewed, vocab) == pytest.approx(-(0.9 * np.log(p0) + 0.1 * np.log(p1)))
    unseen = np.array([7, 8])
    assert unigram_entropy(skewed, unseen, vocab) == pytest.approx(np.log(1000 + vocab))


# ------------------------------------------------------------------------------------------------ tokenize / build


def test_tokenize_appends_separator(tokenizer):
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    texts = ["Hello world.", "床前明月光", ""]
    out = tokenize(texts, tokenizer, batch_size=2)
    assert [a[-1] for a in out] == [eot] * 3 and len(out[2]) == 1
    for text, ids in zip(texts, out, strict=True):
        assert tokenizer.decode(ids[:-1].tolist()) == text and ids.dtype == np.int32


def test_tokenize_needs_the_separator_token():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    no_eot = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(ValueError, match="endoftext"):
        tokenize(["a"], no_eot)


def test_build_dataset_real_data(tmp_path, tokenizer, en_texts, zh_texts):
    texts = en_texts + zh_texts + en_texts[:5]  # 5 exact duplicates
    texts.append(en_texts[7].replace("the", "teh", 1))  # a near duplicate
    texts.append("too short")
    seq_len = 128
    stats = build_dataset(texts, tokenizer, seq_len, tmp_path, heldout_fraction=0.1, show_progress=False)

    assert stats == json.loads((tmp_path / "stats.json").read_text())
    assert stats["docs_in"] == len(texts)
    assert (
        stats["exact_duplicates"] >= 5
        and stats["near_duplicates"] >= 1
        and stats["rejected"]["too_short"] >= 1
    )
    removed = sum(stats["rejected"].values()) + stats["exact_duplicates"] + stats["near_duplicates"]
    assert stats["docs_kept"] == len(texts) - removed == stats["docs"]["train"] + stats["docs"]["heldout"]
    assert 0.05 < stats["docs"]["heldout"] / stats["docs_kept"] < 0.15

    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    cleaned = {clean(t) for t in texts}
    split_docs = {}
    for split in ("train", "heldout"):
        ds = load_packed(tmp_path / split)
        assert ds.seq_len == seq_len and len(ds) == stats["rows"][split] > 0
        assert stats["rows"][split] * seq_len + stats["dropped_tokens"][split] == stats["tokens"][split]
        assert ds.meta["tokenizer_hash"] == stats["tokenizer_hash"]
        flat = np.asarray(ds.tokens).ravel()
        # complete documents (between separators) decode back to cleaned input documents
        cuts = np.flatnonzero(flat == eot)
        docs = [flat[a + 1 : b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        decoded = {tokenizer.decode(d.tolist()) for d in docs}
        assert decoded <= cleaned and len(decoded) == len(docs)  # and no document twice
        split_docs[split] = decoded
        # doc_ids / labels as the model will see them
        batch = next(BatchIterator(ds, 4, seed=0))
        starts = batch["doc_ids"][:, 1:] != batch["doc_ids"][:, :-1]
        assert (batch["labels"][:, 1:][starts] == -100).all()
        assert (batch["input_ids"][:, :-1][starts] == eot).all()  # a new document starts after a separator
    assert split_docs["heldout"] and not split_docs["train"] & split_docs["heldout"]

    baseline = unigram_entropy(
        load_packed(tmp_path / "train"), load_packed(tmp_path / "heldout"), len(tokenizer)
    )
    assert 2.0 < baseline < np.log(len(tokenizer))

    # deterministic: the same inputs give the same bytes
    build_dataset(texts, tokenizer, seq_len, tmp_path / "again", heldout_fraction=0.1, show_progress=False)
    for split in ("train", "heldout"):
        for name in ("tokens.npy", "doc_ids.npy"):
            assert (tmp_path / split / name).read_bytes() == (tmp_path / "again" / split / name).read_bytes()


def test_split_heldout_depends_on_each_text_alone():
    docs = [f"document number {i}" for i in range(2000)]
    held = split_heldout(docs, [10] * len(docs), 0.1)
    assert 150 < held.sum() < 250
    subset = docs[::3]  # the same documents in another corpus land in the same split
    np.testing.assert_array_equal(split_heldout(subset, [10] * len(subset), 0.1), held[::3])
    assert not split_heldout(docs, [10] * len(docs), 0.0).any()
    topped_up = split_heldout(docs[:20], [10] * 20, 0.01, min_tokens=35)
    assert topped_up.sum() == 4  # too few tokens held out: the lowest-hashing documents join


def test_build_dataset_small_heldout_gets_one_row(tmp_path, tokenizer, en_texts):
    stats = build_dataset(
        en_texts[:40], tokenizer, 256, tmp_path, heldout_fraction=0.001, show_progress=False
    )
    assert stats["rows"]["heldout"] >= 1 and stats["docs"]["heldout"] >= 1


# ------------------------------------------------------------------------------------------------ readers


def test_read_texts_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one", "id": 1}\n\n{"text": "two"}\n', encoding="utf-8")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "三"}, ensure_ascii=False) + "\n")
    (tmp_path / "c.txt").write_text("a whole\nplain text file", encoding="utf-8")
    assert read_texts(tmp_path / "a.jsonl") == ["one", "two"]
    assert read_texts([tmp_path / "b.jsonl.gz", str(tmp_path / "c.txt")]) == [
        "三",
        "a whole\nplain text file",
    ]
    assert read_texts(tmp_path) == ["one", "two", "三", "a whole\nplain text file"]  # a folder, sorted
    if ZH.is_file():
        assert len(read_texts(ZH)) == 2069


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"txt": "oops"}', r"line 2: record has no 'text' field \(fields: 'txt'\)"),
        ('{"text": "unterminated', "line 2: invalid JSON"),
        ('{"text": 42}', "line 2: field 'text' must be a string, got int"),
        ('["text"]', "line 2: expected a JSON object"),
    ],
)
def test_read_texts_malformed_record_names_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=message) as err:
        read_texts(path)
    assert str(path) in str(err.value)


def test_read_texts_unknown_type_and_missing_file(tmp_path):
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(DataFormatError, match="unsupported file type"):
        read_texts(tmp_path / "data.csv")
    with pytest.raises(FileNotFoundError):
        read_texts(tmp_path / "nope.jsonl")


def test_dedup_config_validation():
    with pytest.raises(ValueError, match="threshold"):
        DedupConfig(threshold=0.0)
    assert near_dedup([]) == []
    assert near_dedup(["a", "a", "abcdefgh"]) == [0, 2]  # texts shorter than a shingle still work
