"""The annotator page's "My votes" tab: the items this annotator voted on, with their choice (and the votes
before it, undone or changed), and a change of vote while the item is still open.

A change goes through ``Store.change_vote``: the vote before is kept in the store's history (retracted),
and agreement and export, which read active votes, use the newest. Every handler takes the annotator from
the signed-in session (the page's ``signed_in``), never from the page.
"""

from __future__ import annotations

import html
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr

from glmwb.annotation.schema import LETTERS
from glmwb.annotation.store import AnnotatorInfo, Store, StoreError

CHOICE_LABELS = {**{k: f"{k} is better" for k in LETTERS}, "tie": "tie", "both_bad": "both bad"}
MAX_ROWS = 500  # newest first; older ones are in the store (and the export)


def excerpt(messages: list[dict], n: int = 80) -> str:
    """The last user message of a prompt, cut to ``n`` characters (plain text: escape it to show it)."""
    users = [str(m.get("content", "")) for m in messages if m.get("role") == "user"] or [""]
    text = " ".join(users[-1].split())
    return text if len(text) <= n else text[: n - 1] + "…"


@dataclass
class HistoryView:
    tab: gr.Tab
    table: gr.HTML
    item: gr.Dropdown
    choice: gr.Radio
    change: gr.Button
    status: gr.Markdown


def history_tab(tab: gr.Tab) -> HistoryView:
    table = gr.HTML(elem_id="history-table")
    with gr.Row():
        item = gr.Dropdown([], label="item (open items only)", elem_id="change-item", scale=3)
        choice = gr.Radio([(label, k) for k, label in CHOICE_LABELS.items()], label="new choice",
                          elem_id="change-choice", scale=3)  # fmt: skip
        change = gr.Button("Change my vote", elem_id="change-vote", scale=1)
    status = gr.Markdown(elem_id="change-status")
    return HistoryView(tab, table, item, choice, change, status)


class HistoryHandlers:
    def __init__(
        self, store: Store, view: HistoryView, signed_in: Callable[[Store, gr.Request], AnnotatorInfo]
    ):
        self.store, self.v, self.signed_in = store, view, signed_in

    def refresh(self, request: gr.Request, message: str = "") -> dict:
        who = self.signed_in(self.store, request)
        votes = self.store.votes(include_retracted=True, annotator=who.username)
        earlier: dict[int, list[str]] = defaultdict(list)
        for v in votes:
            if v.retracted:
                earlier[v.item_id].append(CHOICE_LABELS.get(v.choice, v.choice))
        active = [v for v in reversed(votes) if not v.retracted][:MAX_ROWS]
        items = self.store.items([v.item_id for v in active])
        rows, open_items = [], []
        for v in active:
            item = items[v.item_id]
            state = "open" if item.status == "open" else "closed"
            mine = CHOICE_LABELS.get(v.choice, v.choice) + (f" ({v.strength})" if v.strength else "")
            rows.append(
                f"<tr><td>{v.item_id}</td><td>{html.escape(excerpt(item.prompt))}</td><td><b>{html.escape(mine)}"
                f"</b></td><td>{html.escape(', '.join(earlier[v.item_id]))}</td><td>{str(v.created_at)[:19]}</td>"
                f"<td>{state}</td></tr>"
            )
            if state == "open":
                open_items.append((f"item {v.item_id}: {excerpt(item.prompt, 40)}", v.item_id))
        head = "<tr><th>item</th><th>prompt</th><th>my vote</th><th>earlier</th><th>when (UTC)</th><th></th></tr>"
        table = (
            f'<table class="glmwb-history"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'
            if rows
            else "<p>No votes yet.</p>"
        )
        return {self.v.table: table, self.v.item: gr.update(choices=open_items, value=None),
                self.v.status: message}  # fmt: skip

    def change(self, item_id: int | None, choice: str | None, request: gr.Request) -> dict:
        who = self.signed_in(self.store, request)
        if item_id is None or choice not in CHOICE_LABELS:
            return {self.v.status: "Pick an item and a new choice."}
        try:
            self.store.change_vote(who, int(item_id), choice, uid=f"ui-{uuid.uuid4().hex}")
        except (StoreError, ValueError) as e:
            return {self.v.status: f"Not changed: {e}"}
        return self.refresh(request, f"Changed: item {item_id}, now {CHOICE_LABELS[choice]}.")

    def wire(self) -> None:
        v = self.v
        outputs = [v.table, v.item, v.status]

        def refresh(request: gr.Request) -> dict:
            return self.refresh(request)

        v.tab.select(refresh, None, outputs, api_visibility="private")
        v.change.click(self.change, [v.item, v.choice], outputs, api_visibility="private")
