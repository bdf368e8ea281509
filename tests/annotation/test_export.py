"""Export to JSONL / Parquet / datasets (TRL's prompt / chosen / rejected + ties, attributes, provenance), read
back by the shared record type and by the reward trainer's reader as is; import of public sets."""

from __future__ import annotations

import gzip
import json

import pytest

from glmwb.annotation.export import export_records, import_preferences, write_records
from glmwb.annotation.records import records_from_dicts
from glmwb.annotation.store import NewItem, NewResponse
from tests.annotation.conftest import make_items
from tests.shared_data import SHARED_DATA

SHARED = SHARED_DATA


def vote(store, who, choice, ratings=None, strength=None):
    task = store.next_task(who)
    store.submit_vote(
        who,
        task.assignment_id,
        choice,
        uid=f"vote-{who.id:03d}-{task.assignment_id:05d}",
        ratings=ratings or {},
        guideline_version="g1",
        strength=strength,
    )
    return task


@pytest.fixture
def voted(sqlite_store):
    """Three annotators on five items: a clear majority, a split, a tie, both bad, and a 3-answer item."""
    store = sqlite_store
    store.policy = store.policy.__class__(gold_rate=0.0)
    ids = store.add_items(make_items(4, overlap=3))
    three = NewItem(
        "p-three",
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Pick one"}],
        [NewResponse(t, f"m{t}", checkpoint=f"/ckpt/{t}", sampling={"temperature": 0.7}) for t in "xyz"],
        overlap=3,
    )
    ids += store.add_items([three])
    people = [store.create_annotator(n, f"password-{n}") for n in ("ann", "bob", "cat")]
    plan = {  # item index -> the three votes
        0: ["A", "A", "B"],
        1: ["A", "B", "tie"],  # no majority
        2: ["tie", "tie", "A"],
        3: ["both_bad", "both_bad", "both_bad"],
        4: ["C", "C", "A"],
    }
    strengths = {0: ["strong", "slight", "clear"]}  # how much better each voter's pick is (item 0 only)
    for k in range(5):
        for i, (who, choice) in enumerate(zip(people, plan[k], strict=True)):
            ratings = {"helpfulness": {"A": 5, "B": 2}} if k == 0 else None
            task = vote(store, who, choice, ratings, strengths.get(k, [None] * 3)[i])
            assert task.item_id == ids[k]
    return store, ids


def test_majority_export(voted):
    store, ids = voted
    result = export_records(store)
    assert result.skipped == {"no_majority": 1}
    by_item = {}
    for row in result.rows:
        by_item.setdefault(row["provenance"]["item_id"], []).append(row)
    assert set(by_item) == {ids[0], ids[2], ids[3], ids[4]}
    items = store.items()
    (r0,) = by_item[ids[0]]
    texts = {r.letter: r.text for r in items[ids[0]].responses}
    assert r0["chosen"] == [{"role": "assistant", "content": texts["A"]}]
    assert r0["rejected"] == [{"role": "assistant", "content": texts["B"]}]
    assert r0["tie"] is False and r0["annotator"] is None
    assert r0["attributes"] == {"helpfulness": 1}
    # A's two voters said strong (1) and slight (1/3); the B voter's "clear" is not about A
    assert r0["margin"] == pytest.approx(2 / 3)
    prov = r0["provenance"]
    assert prov["strengths"] == ["strong", "slight", "clear"]
    assert prov["label"] == "A" and prov["votes"]["A"] == 2 and prov["votes"]["B"] == 1
    assert prov["agreement"] == pytest.approx(2 / 3)
    assert prov["annotators"] == ["ann", "bob", "cat"] and len(prov["vote_uids"]) == 3
    assert prov["guideline_versions"] == ["g1"] and prov["models"][0] in ("model-a", "model-b")
    (r2,) = by_item[ids[2]]
    assert r2["tie"] is True and r2["provenance"]["label"] == "tie"
    (r3,) = by_item[ids[3]]
    assert r3["tie"] is True and r3["provenance"]["label"] == "both_bad"
    # three answers, C wins: C over A and C over B, with the answers' provenance
    rows = by_item[ids[4]]
    assert sorted(r["provenance"]["letters"][1] for r in rows) == ["A", "B"]
    assert all(r["provenance"]["letters"][0] == "C" for r in rows)
    assert rows[0]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert json.loads(rows[0]["provenance"]["sampling"][0]) == {"temperature": 0.7}
    assert rows[0]["provenance"]["checkpoints"][0].startswith("/ckpt/")
    assert rows[0]["margin"] is None and r2["margin"] is None  # no strength given; a tie
    records = records_from_dicts(result.rows)
    assert [r.tie for r in records] == [r["tie"] for r in result.rows]


def test_all_votes_export_and_options(voted):
    store, ids = voted
    everything = export_records(store, mode="all")
    assert len(everything.rows) == 3 + 3 + 3 + 3 + (2 + 2 + 2)  # 3 answers: a winner beats two others
    annotators = {r["annotator"] for r in everything.rows}
    assert annotators == {"ann", "bob", "cat"}
    assert all(r["id"].startswith("vote") for r in everything.rows)
    first = [r for r in everything.rows if r["provenance"]["item_id"] == ids[0]]
    assert [(r["annotator"], r["margin"]) for r in first] == [("ann", 1.0), ("bob", 1 / 3), ("cat", 2 / 3)]
    no_ties = export_records(store, ties="drop")
    assert not any(r["tie"] for r in no_ties.rows)
    no_both_bad = export_records(store, both_bad="drop")
    assert {r["provenance"]["label"] for r in no_both_bad.rows} == {"A", "tie", "C"}
    assert export_records(store, min_votes=4).rows == []


def test_written_files_are_read_by_the_reward_trainer(voted, tmp_path):
    """JSONL, Parquet and a datasets folder: each read back by rewards.data.read_preferences as is."""
    from datasets import load_dataset

    from glmwb.annotation.preference_data import read_preferences

    store, _ = voted
    rows = export_records(store, mode="all").rows
    expected = records_from_dicts(rows)
    for name in ("prefs.jsonl", "prefs.parquet", "prefs_ds"):
        path = write_records(rows, tmp_path / name)
        read = read_preferences(path)
        assert read.skipped == []
        assert [
            (r.prompt, r.chosen, r.rejected, r.tie, r.annotator, r.margin, dict(r.attributes))
            for r in read.records
        ] == [
            (r.prompt, r.chosen, r.rejected, r.tie, r.annotator, r.margin, dict(r.attributes))
            for r in expected
        ], name
    # TRL's loader view: prompt is a conversation, chosen / rejected one assistant message each
    ds = load_dataset("json", data_files=str(tmp_path / "prefs.jsonl"), split="train")
    assert {"prompt", "chosen", "rejected"} <= set(ds.column_names)
    assert ds[0]["chosen"][0]["role"] == "assistant" and ds[0]["prompt"][-1]["role"] == "user"


def test_import_prompt_chosen_rejected_and_export_back(sqlite_store, tmp_path):
    rows = [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
         "rejected": "Go away.", "tie": False},
        {"prompt": "Colour of the sky?", "chosen": "Blue.", "rejected": "Blue!", "tie": True},
        {"prompt": "", "chosen": "x", "rejected": "y"},  # invalid: skipped and reported
    ]  # fmt: skip
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = import_preferences(sqlite_store, path, source="demo")
    assert result.items == 3 and len(result.skipped) == 1 and "row 4" in result.skipped[0]
    again = import_preferences(sqlite_store, path, source="demo")
    assert again.items == 0 and again.already_imported == 3  # idempotent
    # imported items are closed: nobody is asked to label them again
    alice = sqlite_store.create_annotator("alice", "password-1")
    assert sqlite_store.next_task(alice) is None
    out = export_records(sqlite_store).rows
    pairs = {(r["chosen"][0]["content"], r["rejected"][0]["content"], r["tie"]) for r in out}
    assert pairs == {("4", "5", False), ("Hello!", "Go away.", False), ("Blue.", "Blue!", True)}
    assert {r["provenance"]["annotators"][0] for r in out} == {"import:demo"}


def test_import_hh_rlhf_transcripts(sqlite_store, tmp_path):
    row = {
        "chosen": "\n\nHuman: What is the capital of France?\n\nAssistant: Paris.",
        "rejected": "\n\nHuman: What is the capital of France?\n\nAssistant: I don't know.",
    }
    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(row) + "\n")
    assert import_preferences(sqlite_store, path, source="hh", open_for_annotation=True, overlap=2).items == 1
    (r,) = export_records(sqlite_store).rows
    assert r["prompt"] == [{"role": "user", "content": "What is the capital of France?"}]
    assert (r["chosen"][0]["content"], r["rejected"][0]["content"]) == ("Paris.", "I don't know.")
    alice = sqlite_store.create_annotator("alice", "password-1")
    task = sqlite_store.next_task(alice)  # opened: people may label it again
    assert task is not None and sorted(task.responses) == ["I don't know.", "Paris."]


@pytest.mark.skipif(not (SHARED / "hh_rlhf").exists(), reason="../shared/data is not beside this checkout")
def test_import_real_hh_rlhf_sample(sqlite_store, tmp_path):
    path = SHARED / "hh_rlhf" / "helpful-base" / "test.jsonl.gz"
    result = import_preferences(sqlite_store, path, limit=200)
    assert result.items == 200
    rows = export_records(sqlite_store).rows
    assert len(rows) == 200
    out = write_records(rows, tmp_path / "hh.parquet")
    from glmwb.annotation.preference_data import read_preferences

    assert len(read_preferences(out).records) == 200


def test_import_cli_stops_at_a_bad_row_unless_told_to_skip(sqlite_url, tmp_path, capsys, monkeypatch):
    """`glmwb annotation import`: a malformed row is a user error (exit 2, file / row / field named) and
    nothing is imported; with --skip-invalid the good rows go in and every skipped row is in the report."""
    from glmwb.annotation.store import Store
    from glmwb.recipes.cli import main

    monkeypatch.chdir(tmp_path)
    rows = [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": "q", "chosen": "a", "rejected": "b", "weight": float("inf")},
        {"prompt": "Colour of the sky?", "chosen": "Blue.", "rejected": "Green."},
        {"prompt": "q", "chosen": "same", "rejected": "same"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    db = ["--db", sqlite_url]
    assert main(["annotation", "import", *db, str(path)]) == 2
    err = capsys.readouterr().err
    assert "pairs.jsonl, row 2: field 'weight' must be a finite number" in err and "Traceback" not in err
    store = Store(sqlite_url)
    assert store.counts()["items"] == 0  # nothing half-imported
    report = tmp_path / "skipped.txt"
    assert (
        main(["annotation", "import", *db, str(path), "--skip-invalid", "--skipped-report", str(report)]) == 0
    )
    assert store.counts()["items"] == 2
    lines = report.read_text().splitlines()
    assert len(lines) == 2 and "row 2" in lines[0] and "row 4" in lines[1] and "not a tie" in lines[1]
    store.close()


def test_unreadable_files_and_bad_items_are_refused_at_entry(sqlite_url, tmp_path, capsys, monkeypatch):
    """A corrupt .gz, non-UTF-8 bytes, a prompt with an unknown role (`human`), a responses file that is not
    JSON: each is one line naming the file and row (exit 2), and nothing reaches the store, so no bad item
    can block a later export."""
    import gzip

    from glmwb.annotation.store import Store
    from glmwb.recipes.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "corrupt.jsonl.gz").write_bytes(b"not gzip at all")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "q", "chosen": "caf\xe9", "rejected": "b"}\n')
    with gzip.open(tmp_path / "ok.jsonl.gz", "wt") as f:
        f.write(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    human = {"prompt": [{"role": "human", "content": "hi"}], "responses": ["a", "b"]}
    (tmp_path / "human.jsonl").write_text(json.dumps(human) + "\n")
    (tmp_path / "garbage.jsonl").write_text("{not json\n")
    cases = [
        (["import", "corrupt.jsonl.gz"], "corrupt.jsonl.gz: cannot be read"),
        (["import", "latin1.jsonl"], "latin1.jsonl: cannot be read: not UTF-8 text"),
        (
            ["add-tasks", "--responses", "human.jsonl"],
            "human.jsonl, row 1: field 'prompt'[0].role is 'human'",
        ),
        (["add-tasks", "--responses", "garbage.jsonl"], "garbage.jsonl, row 1 (line 1): not JSON"),
    ]
    for args, message in cases:
        assert main(["annotation", args[0], "--db", sqlite_url, *args[1:]]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    store = Store(sqlite_url)
    assert store.counts()["items"] == 0
    assert main(["annotation", "import", "--db", sqlite_url, "ok.jsonl.gz"]) == 0  # .gz itself is fine
    assert store.counts()["items"] == 1
    store.close()
