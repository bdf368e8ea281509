"""A seeded fuzz test of the preference reader and the store's import: thousands of malformed rows, never
an exception other than the named PreferenceDataError, and never a partial import."""

from __future__ import annotations

import json
import math
import random

import pytest

from glmwb.annotation.preference_data import read_preferences
from glmwb.annotation.records import PreferenceDataError, PreferenceRecord

_GOOD = {"prompt": [{"role": "user", "content": "What is 2+2?"}], "chosen": "4", "rejected": "5"}
_ODD_VALUES = [
    None, True, 0, -1, 2**63, -(2**70), 1.5, math.nan, math.inf, -math.inf, "", " ", "x", "\ud800", "\u202e12",
    "a" * 5000, [], [None], [1, 2], {}, {"role": "user"}, {"content": "x"}, {"role": "bot", "content": "x"},
    [{"role": "user", "content": None}], [{"role": "assistant", "content": "x"}], [{"role": "user", "content": 3}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}],
]  # fmt: skip
_KEYS = [
    "prompt",
    "chosen",
    "rejected",
    "tie",
    "weight",
    "margin",
    "attributes",
    "annotator",
    "id",
    "provenance",
]


def mutate(rng: random.Random) -> object:
    """A row derived from a good one by one to three random edits (or not a mapping at all)."""
    if rng.random() < 0.05:
        return rng.choice(_ODD_VALUES)
    row = json.loads(json.dumps(_GOOD))
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(_KEYS)
        action = rng.random()
        if action < 0.2:
            row.pop(key, None)
        elif action < 0.9:
            row[key] = rng.choice(_ODD_VALUES)
        else:
            row[key + "_extra"] = rng.choice(_ODD_VALUES)
    return row


def test_thousands_of_malformed_rows_give_records_or_named_errors_only() -> None:
    rng = random.Random(0)
    outcomes = {"record": 0, "refused": 0}
    for i in range(3000):
        row = mutate(rng)
        try:
            (record,) = read_preferences([row], name="fuzz.jsonl").records
        except PreferenceDataError as e:
            assert "fuzz.jsonl, row 1" in str(e), str(e)
            outcomes["refused"] += 1
            continue
        except Exception as e:  # pragma: no cover - the failure this test exists to catch
            pytest.fail(f"row {i} {row!r:.200} raised {type(e).__name__}: {e}")
        # whatever was accepted is a usable record: finite numbers, valid text, a round trip
        assert isinstance(record, PreferenceRecord)
        assert math.isfinite(record.weight) and (record.margin is None or math.isfinite(record.margin))
        for text in [record.chosen, record.rejected, *(m["content"] for m in record.prompt)]:
            text.encode("utf-8")
        assert PreferenceRecord.from_dict(record.to_dict()) == record
        outcomes["record"] += 1
    assert outcomes["refused"] > 1000 and outcomes["record"] > 100, outcomes


def test_a_file_with_bad_rows_imports_all_or_nothing(sqlite_store, tmp_path) -> None:
    """Without skip_invalid a file with any bad row imports nothing; with it, exactly the good rows."""
    from glmwb.annotation.export import import_preferences

    rng = random.Random(1)
    for trial in range(20):
        rows = [
            mutate(rng) if rng.random() < 0.3 else {**_GOOD, "chosen": f"answer {trial}-{i}"}
            for i in range(30)
        ]
        path = tmp_path / f"f{trial}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8", errors="surrogatepass")
        before = sqlite_store.counts()["items"]
        try:
            import_preferences(sqlite_store, path, source=f"f{trial}", skip_invalid=False)
        except PreferenceDataError:
            assert sqlite_store.counts()["items"] == before  # nothing half-imported
        result = import_preferences(sqlite_store, path, source=f"g{trial}", skip_invalid=True)
        good = len(read_preferences(path, skip_invalid=True).records)
        assert result.items + result.already_imported == good
