"""End to end: a local Argilla server (SQLite, Redis, our SQL search engine); `glmwb argilla push` puts 20
arithmetic comparisons there with a reward model's suggestions; one annotator answers every item on
Argilla's real web page in headless Chromium (reading the question and both answers off the page), another
through the SDK; `glmwb argilla pull` brings the responses back (twice: nothing is added the second time; a
changed response is updated, both versions kept); the exported preference pairs are exactly the ones the two
annotators agreed on, with the right chosen / rejected answers and both annotators named."""

from __future__ import annotations

import re
import uuid

import pytest

from glmwb.annotation.argilla import DEFAULT_GUIDELINES, connect
from glmwb.annotation.export import export_records
from glmwb.annotation.store import NewItem, NewResponse, Store
from glmwb.recipes.cli import main
from tests.annotation.conftest import argilla_user

N = 20
SDK_WRONG = {3, 7, 11}  # items (by prompt number) where the SDK annotator picks the wrong answer
SDK_TIE = {5}  # ... and where it says tie


def arithmetic_items() -> list[NewItem]:
    return [
        NewItem(
            prompt_uid=f"sum{i}",
            prompt=[{"role": "user", "content": f"What is {i}+{i}?"}],
            responses=[NewResponse(str(2 * i), "right-model"), NewResponse(str(2 * i + 1), "wrong-model")],
            overlap=2,
        )
        for i in range(N)
    ]


def right_letter(text: str) -> tuple[int, str]:
    """What a careful annotator picks on the page: (the prompt's number, the letter of the right sum)."""
    q = re.search(r"What is (\d+)\+(\d+)\?", text)
    a = re.search(r"Answer A\s+(\d+)", text)
    b = re.search(r"Answer B\s+(\d+)", text)
    assert q and a and b, text[:500]
    total = int(q.group(1)) + int(q.group(2))
    assert total in (int(a.group(1)), int(b.group(1)))
    return int(q.group(1)), "A" if int(a.group(1)) == total else "B"


def annotate_in_browser(browser, url: str, username: str, password: str, dataset_id: str) -> dict[int, str]:
    """Sign in on Argilla's page and submit every pending record; returns {prompt number: letter}."""
    page = browser.new_page()
    try:
        page.goto(f"{url}/sign-in")
        page.fill("input[name=Username]", username)
        page.fill("input[name=Password]", password)
        page.keyboard.press("Enter")
        page.wait_for_url(f"{url}/", timeout=30_000)
        page.goto(f"{url}/dataset/{dataset_id}/annotation-mode")
        done: dict[int, str] = {}
        for _ in range(N):
            page.get_by_text("Answer A").first.wait_for(timeout=30_000)
            number, letter = right_letter(page.inner_text("body"))
            assert number not in done, f"prompt {number} shown twice"
            if not page.is_checked(f"#preference_{letter}"):  # the RM's suggestion comes pre-selected
                page.click(f"label[for=preference_{letter}]")
            assert page.is_checked(f"#preference_{letter}")
            page.get_by_role("button", name="Submit").click()
            page.wait_for_function(
                "n => !document.body.innerText.includes(`What is ${n}+${n}?`)", arg=number, timeout=30_000
            )
            done[number] = letter
        return done
    finally:
        page.close()


def sdk_answers(client, dataset, user_id: str, store: Store) -> dict[int, str]:
    """The SDK annotator's responses (logged with its user id, as Argilla's SDK does for a user)."""
    import argilla as rg

    letters = {f"item-{i}": [r.text for r in it.responses] for i, it in store.items().items()}
    chosen, records = {}, []
    for record in dataset.records(with_responses=True):
        texts = letters[record.id]
        number = int(texts[0]) // 2
        right = "A" if int(texts[0]) == 2 * number else "B"
        value = (
            "tie" if number in SDK_TIE else ({"A": "B", "B": "A"}[right] if number in SDK_WRONG else right)
        )
        record.responses.add(rg.Response("preference", value, user_id=user_id, status="submitted"))
        chosen[number] = value
        records.append(record)
    dataset.records.log(records)
    return chosen


@pytest.mark.browser
def test_push_annotate_in_browser_and_sdk_pull_twice_export(
    local_argilla, browser, tiny_tokenizer, tmp_path, monkeypatch, capsys
):
    from glmwb.rewards.model import RewardModel
    from glmwb.rewards.scoring import RewardScorer
    from tests.rewards.conftest import tiny_glm

    db = f"sqlite:///{tmp_path / 'store.db'}"
    with Store(db) as store:
        store.add_items(arithmetic_items(), seed=3)
    rm = RewardModel(tiny_glm(tiny_tokenizer), heads=["reward"]).save(
        tmp_path / "rm", tokenizer=tiny_tokenizer
    )
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("ARGILLA_API_KEY", local_argilla.api_key)
    conn = ["--db", db, "--url", local_argilla.url, "--dataset", name]
    assert main(["argilla", "push", *conn, "--reward-model", str(rm), "--agent", "tiny-rm"]) == 0

    client = connect(local_argilla.url, local_argilla.api_key)
    dataset = client.datasets(name=name, workspace="argilla")
    assert dataset.settings.distribution.min_submitted == 2  # the store's overlap
    assert dataset.settings.guidelines == DEFAULT_GUIDELINES
    assert [q.name for q in dataset.settings.questions][:3] == [
        "preference",
        "correctness_a",
        "correctness_b",
    ]
    assert {f.name for f in dataset.settings.fields} == {"prompt", "response_a", "response_b"}
    records = {r.id: r for r in dataset.records(with_suggestions=True)}
    assert len(records) == N
    store = Store(db)
    items = store.items()
    scorer = RewardScorer.from_pretrained(rm, device="cpu")
    for item_id, item in items.items():
        rewards = scorer.score([item.prompt, item.prompt], [r.text for r in item.responses])
        suggestion = records[f"item-{item_id}"].suggestions["preference"]
        assert suggestion.agent == "tiny-rm"
        assert suggestion.value == ("A" if rewards[0] >= rewards[1] else "B")
        assert records[f"item-{item_id}"].metadata["model_a"] == item.responses[0].model

    argilla_user(local_argilla, client, "web-annotator", "web-password-1")
    sdk = argilla_user(local_argilla, client, "sdk-annotator", "sdk-password-1")
    by_page = annotate_in_browser(
        browser, local_argilla.url, "web-annotator", "web-password-1", str(dataset.id)
    )
    assert sorted(by_page) == list(range(N))
    by_sdk = sdk_answers(client, dataset, sdk["id"], store)

    capsys.readouterr()
    assert main(["argilla", "pull", *conn]) == 0
    assert "new votes 40, changed 0, unchanged 0" in capsys.readouterr().out
    assert main(["argilla", "pull", *conn]) == 0  # again: nothing new
    assert "new votes 0, changed 0, unchanged 40" in capsys.readouterr().out
    assert len(store.votes()) == 2 * N and len(store.votes(include_retracted=True)) == 2 * N

    rows = export_records(store).rows
    agreed = {n for n in range(N) if by_sdk[n] == by_page[n]}
    assert len(agreed) == N - len(SDK_WRONG) - len(SDK_TIE)
    assert {int(r["prompt"][0]["content"].split("+")[1].rstrip("?")) for r in rows} == agreed
    for r in rows:
        n = int(r["prompt"][0]["content"].split("+")[1].rstrip("?"))
        assert (r["chosen"][-1]["content"], r["rejected"][-1]["content"]) == (str(2 * n), str(2 * n + 1))
        assert r["provenance"]["annotators"] == ["web-annotator@argilla", "sdk-annotator@argilla"]

    # The SDK annotator corrects one answer in Argilla: the next pull updates it and keeps the old one.
    fixed = min(SDK_WRONG)
    fixed_id = next(i for i, it in items.items() if it.prompt[0]["content"] == f"What is {fixed}+{fixed}?")
    sdk_fix(dataset, sdk["id"], f"item-{fixed_id}", by_page[fixed])
    assert main(["argilla", "pull", *conn]) == 0
    assert "new votes 0, changed 1, unchanged 39" in capsys.readouterr().out
    assert len(store.votes()) == 2 * N and len(store.votes(include_retracted=True)) == 2 * N + 1
    assert len(export_records(store).rows) == len(agreed) + 1
    # ... and discards another: its vote is withdrawn from the store (kept, retracted).
    dropped = next(i for i, it in items.items() if it.prompt[0]["content"] == "What is 0+0?")
    sdk_fix(dataset, sdk["id"], f"item-{dropped}", by_page[0], status="discarded")
    assert main(["argilla", "pull", *conn]) == 0
    assert "new votes 0, changed 0, unchanged 39, withdrawn 1" in capsys.readouterr().out
    assert len(store.votes()) == 2 * N - 1 and len(store.votes(include_retracted=True)) == 2 * N + 1
    assert main(["argilla", "status", *conn]) == 0
    assert '"store_votes_from_argilla": 39' in capsys.readouterr().out
    store.close()


def sdk_fix(dataset, user_id: str, record_id: str, letter: str, status: str = "submitted") -> None:
    """The SDK annotator's changed answer to one record (the owner's client logs it with the user's id)."""
    import argilla as rg

    for record in dataset.records(with_responses=True):
        if record.id == record_id:
            kept = [r for r in record.responses if str(r.user_id) != user_id]
            fresh = rg.Record(id=record.id, fields=record.fields.to_dict(), responses=[
                *[rg.Response(r.question_name, r.value, user_id=r.user_id, status=r.status) for r in kept],
                rg.Response("preference", letter, user_id=user_id, status=status),
            ])  # fmt: skip
            dataset.records.log([fresh])
            return
    raise AssertionError(f"no record {record_id}")
