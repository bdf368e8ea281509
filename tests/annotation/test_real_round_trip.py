"""Lossless round trips on the full real files in ../shared/data: HH-RLHF helpful-base (2,354 transcripts) and
OASST1-zh ranked pairs (1,809) go import → store (SQLite) → export → JSONL, Parquet and a ``datasets`` folder
→ read back, and every text comes back byte for byte (an HH-RLHF transcript rebuilt from the record is the
original string), every exported field in every format, every left-out row accounted for by id."""

from __future__ import annotations

import gzip
import json

import pytest

from glmwb.annotation.export import JSON_COLUMNS, export_records, import_preferences, write_records
from glmwb.annotation.preference_data import hh_transcript, iter_rows, read_preferences
from glmwb.annotation.store import Store
from tests.shared_data import SHARED_DATA

HH = SHARED_DATA / "hh_rlhf" / "helpful-base" / "test.jsonl.gz"
ZH = SHARED_DATA / "zh_preference" / "oasst_rm_zh" / "oasst_rm_zh_pairs.jsonl"
pytestmark = pytest.mark.skipif(not HH.is_file() or not ZH.is_file(), reason="../shared/data is absent")
FORMATS = ("prefs.jsonl", "prefs.parquet", "prefs_ds")


def raw_rows(path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def round_trip(path, tmp_path) -> tuple[object, list[dict], dict[str, list]]:
    """Import the whole file into a fresh store and export it to every format; (import result, the export's
    rows, {format: rows read back by iter_rows, JSON columns decoded})."""
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        result = import_preferences(store, path, skip_invalid=True)
        rows = export_records(store).rows
    finally:
        store.close()
    back = {}
    for name in FORMATS:
        out = write_records(rows, tmp_path / name)
        back[name] = [
            {k: json.loads(v) if k in JSON_COLUMNS and name != "prefs.jsonl" else v for k, v in row.items()}
            for _, row in iter_rows(out)
        ]
        records = read_preferences(out).records  # the reader every stage uses takes it as is
        assert [r.id for r in records] == [r["id"] for r in rows]
    return result, rows, back


def test_hh_rlhf_round_trip_is_byte_for_byte(tmp_path):
    source = raw_rows(HH)
    result, rows, back = round_trip(HH, tmp_path)
    # every row is imported, or left out for a reason named with its row
    assert result.items + len(result.skipped) + result.already_imported == len(source) == 2354
    assert result.items == len(rows) == 2339 and result.duplicates == []  # 13 + 2 of one answer twice
    for name, got in back.items():
        assert got == rows, name  # every field of every row, in every format
        for row in got:
            record_id = row["provenance"]["record_id"]  # "helpful-base/test.jsonl.gz:ROW"
            assert record_id.startswith("helpful-base/test.jsonl.gz:")
            original = source[int(record_id.rsplit(":", 1)[1]) - 1]
            prompt = row["prompt"]
            assert hh_transcript([*prompt, *row["chosen"]]) == original["chosen"], record_id
            assert hh_transcript([*prompt, *row["rejected"]]) == original["rejected"], record_id
            assert row["chat_template_kwargs"] == {"sanitize_control_tokens": True, "end_final_turn": True}
            assert row["attributes"] == {} and row["provenance"]["record_provenance"] == {"source": "hh_rlhf"}
    # the turns whose whitespace an earlier importer stripped ("Human:  Do you" kept its second space)
    kept = [m["content"] for r in rows for m in r["prompt"] if m["content"] != m["content"].strip()]
    assert len(kept) >= 5 and any(c.startswith(" ") for c in kept)


def test_oasst_zh_round_trip_keeps_every_text_and_field(tmp_path):
    source = {r["id"]: r for r in raw_rows(ZH)}
    result, rows, back = round_trip(ZH, tmp_path)
    assert result.items + len(result.skipped) + result.already_imported == len(source) == 1809
    assert result.items == len(rows) == 1798
    assert len(result.skipped) == 6 and all("the same text" in s for s in result.skipped)  # one reply twice
    # five pairs are in the file twice (under two ids): each left-out copy is named with the one kept
    assert len(result.duplicates) == result.already_imported == 5
    for line in result.duplicates:
        dup, kept = line.split(": the same pair as ")
        a, b = source[dup], source[kept]
        assert (a["prompt"], a["history"], a["chosen"], a["rejected"]) == (
            b["prompt"],
            b["history"],
            b["chosen"],
            b["rejected"],
        )
    for name, got in back.items():
        assert got == rows, name
        for row in got:
            original = source[row["provenance"]["record_id"]]
            history = [
                {"role": role, "content": text}
                for turn in original["history"]
                for role, text in zip(("user", "assistant"), turn, strict=True)
            ]
            assert row["prompt"] == [*history, {"role": "user", "content": original["prompt"]}]
            assert row["chosen"] == [{"role": "assistant", "content": original["chosen"]}]
            assert row["rejected"] == [{"role": "assistant", "content": original["rejected"]}]
            assert row["margin"] == original["rejected_rank"] - original["chosen_rank"]
            assert row["provenance"]["record_provenance"] == {"source": original["source"]}


def test_exact_duplicate_pairs_are_reported_by_id(tmp_path):
    """A pair given twice in one file, or imported again, is added once, and each left-out copy is named."""
    rows = raw_rows(HH)[:3]
    path = tmp_path / "dups.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*rows, rows[1]]), encoding="utf-8")
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        first = import_preferences(store, path, format="hh_rlhf")
        assert first.items == 3 and first.already_imported == 1
        assert first.duplicates == [
            f"{tmp_path.name}/dups.jsonl:4: the same pair as {tmp_path.name}/dups.jsonl:2"
        ]
        again = import_preferences(store, path, format="hh_rlhf")
        assert again.items == 0 and again.already_imported == 4
        assert [d.split(": ")[0] for d in again.duplicates] == [
            f"{tmp_path.name}/dups.jsonl:{i}" for i in (1, 2, 3, 4)
        ]
        assert all("already in the store" in d for d in again.duplicates)
    finally:
        store.close()
