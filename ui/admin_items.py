"""The Admin tab's item browser and disputes: search prompts and answers, filter by state (open / complete /
disputed / closed), model, annotator and gold, open an item to see every vote and rationale; disputed items
(annotators split, or against gold) listed first, each with one click to ask for one more vote.

Every handler checks that the signed-in account is an admin (``admin_only``). Item text is rendered by
``ui.render`` (model output is untrusted) or shown in a Dataframe as text.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr

from glmwb.annotation.browse import STATES, ItemState, find_items, item_states
from glmwb.annotation.store import AnnotatorInfo, ItemInfo, Store, StoreError, VoteRow
from glmwb.ui.history import CHOICE_LABELS, excerpt
from glmwb.ui.render import render_markdown, render_prompt

MAX_SHOWN = 200  # rows of a result list (the count says how many matched)
RESULT_HEADERS = ["item", "state", "votes", "models", "prompt"]
DISPUTE_HEADERS = ["item", "why", "votes", "wanted", "prompt", "action"]
MORE = "+ one more vote"


@dataclass
class ItemsView:
    query: gr.Textbox
    state: gr.Dropdown
    model: gr.Dropdown
    annotator: gr.Dropdown
    gold: gr.Radio
    search: gr.Button
    count: gr.Markdown
    results: gr.Dataframe
    detail: gr.HTML
    disputes: gr.Dataframe
    dispute_status: gr.Markdown


def items_section() -> ItemsView:
    gr.Markdown("### Disputed items (annotators split, or against gold)")
    disputes = gr.Dataframe(headers=DISPUTE_HEADERS, interactive=False, elem_id="admin-disputes", wrap=True)
    dispute_status = gr.Markdown(elem_id="admin-dispute-status")
    gr.Markdown("### Items")
    with gr.Row():
        query = gr.Textbox(label="search prompts and answers", elem_id="items-query", scale=3)
        state = gr.Dropdown(["any", *STATES], value="any", label="state", elem_id="items-state")
        model = gr.Dropdown(["any"], value="any", label="model", elem_id="items-model")
        annotator = gr.Dropdown(["any"], value="any", label="annotator", elem_id="items-annotator")
        gold = gr.Radio(["any", "gold", "regular"], value="any", label="gold", elem_id="items-gold")
    search = gr.Button("Search", elem_id="items-search")
    count = gr.Markdown(elem_id="items-count")
    results = gr.Dataframe(headers=RESULT_HEADERS, interactive=False, elem_id="items-results", wrap=True)
    detail = gr.HTML(elem_id="item-detail")
    return ItemsView(query, state, model, annotator, gold, search, count, results, detail, disputes,
                     dispute_status)  # fmt: skip


def _votes_cell(s: ItemState) -> str:
    return ", ".join(f"{c} {n}" for c, n in sorted(s.votes.items())) or "none"


def item_detail(item: ItemInfo, state: ItemState, votes: list[VoteRow]) -> str:
    """Everything about one item: prompt, answers (with their models), gold, state, every vote (undone and
    changed ones too) with its rationale."""
    answers = "".join(
        f'<div class="glmwb-detail-answer"><b>Answer {r.letter}</b> · model {html.escape(r.model)}'
        f'<div class="glmwb-scroll">{render_markdown(r.text)}</div></div>'
        for r in item.responses
    )
    rows = "".join(
        f"<tr><td>{html.escape(v.annotator)}</td><td>{html.escape(CHOICE_LABELS.get(v.choice, v.choice))}</td>"
        f"<td>{v.strength or ''}</td><td>{html.escape(v.rationale)}</td><td>{v.time_spent_s or ''}</td>"
        f"<td>{str(v.created_at)[:19]}</td><td>{'undone / changed' if v.retracted else 'active'}</td></tr>"
        for v in votes
    )
    gold = f" · gold: <b>{html.escape(item.gold_choice)}</b>" if item.gold_choice else ""
    why = f" ({html.escape(state.reason)})" if state.reason else ""
    return (
        f'<div id="item-detail-body"><h3>Item {item.item_id}</h3><p>state: <b>{state.state}</b>{why}{gold} · '
        f"{state.overlap} votes wanted · batch {html.escape(item.batch) or '-'}</p>{render_prompt(item.prompt)}"
        f'<div class="glmwb-detail-answers">{answers}</div>'
        "<table><thead><tr><th>annotator</th><th>choice</th><th>strength</th><th>rationale</th><th>time (s)</th>"
        f"<th>when (UTC)</th><th></th></tr></thead><tbody>{rows}</tbody></table></div>"
    )


class ItemsHandlers:
    def __init__(self, store: Store, view: ItemsView, admin_only: Callable[[gr.Request], AnnotatorInfo]):
        self.store, self.v, self.admin_only = store, view, admin_only

    def _load(self) -> tuple[dict[int, ItemInfo], dict[int, ItemState]]:
        items = self.store.items()
        return items, item_states(items, self.store.votes())

    def search(self, query: str, state: str, model: str, annotator: str, gold: str, request: gr.Request):
        self.admin_only(request)
        items, states = self._load()
        found = find_items(items, states, query or "", state, model, annotator, gold)
        rows = [[i, states[i].state + (f" ({states[i].reason})" if states[i].reason else ""),
                 _votes_cell(states[i]), ", ".join(states[i].models), excerpt(items[i].prompt)]
                for i in found[:MAX_SHOWN]]  # fmt: skip
        models = sorted({m for s in states.values() for m in s.models})
        people = sorted(a.username for a in self.store.annotators() if a.role != "external")
        return {
            self.v.count: f"**{len(found)}** of {len(items)} items match"
            + (f" (the first {MAX_SHOWN} shown)" if len(found) > MAX_SHOWN else ""),
            self.v.results: {"headers": RESULT_HEADERS, "data": rows},
            self.v.model: gr.update(choices=["any", *models]),
            self.v.annotator: gr.update(choices=["any", *people]),
            self.v.disputes: self._disputes(items, states),
        }

    def _disputes(self, items: dict[int, ItemInfo], states: dict[int, ItemState]) -> dict:
        found = find_items(items, states, state="disputed")
        rows = [[i, states[i].reason, _votes_cell(states[i]), states[i].overlap, excerpt(items[i].prompt),
                 MORE if states[i].gold is None and items[i].status == "open" else ""]
                for i in found[:MAX_SHOWN]]  # fmt: skip
        return {"headers": DISPUTE_HEADERS, "data": rows}

    def open_item(self, evt: gr.SelectData, request: gr.Request) -> dict:
        self.admin_only(request)
        item_id = int(evt.row_value[0])
        items = self.store.items([item_id])
        if item_id not in items:
            return {self.v.detail: f"<p>No item {item_id}.</p>"}
        votes = [v for v in self.store.votes(include_retracted=True) if v.item_id == item_id]
        state = item_states(items, votes)[item_id]
        return {self.v.detail: item_detail(items[item_id], state, votes)}

    def dispute_click(self, evt: gr.SelectData, request: gr.Request) -> dict:
        """A click on a dispute's "+ one more vote" asks for one more vote; on another cell, opens it."""
        self.admin_only(request)
        item_id = int(evt.row_value[0])
        if evt.value != MORE:
            return {**self.open_item(evt, request), self.v.dispute_status: ""}
        try:
            overlap = self.store.add_votes_wanted(item_id)
            message = f"Item {item_id} now wants {overlap} votes: the next annotator without it gets it."
        except StoreError as e:
            message = f"Not changed: {e}"
        items, states = self._load()
        return {self.v.dispute_status: message, self.v.disputes: self._disputes(items, states)}

    def wire(self, refresh: gr.Button) -> None:
        v = self.v
        filters = [v.query, v.state, v.model, v.annotator, v.gold]
        outputs = [v.count, v.results, v.model, v.annotator, v.disputes]
        for event in (v.search.click, v.query.submit, refresh.click):
            event(self.search, filters, outputs, api_visibility="private")
        v.results.select(self.open_item, None, [v.detail], api_visibility="private")
        v.disputes.select(self.dispute_click, None, [v.detail, v.dispute_status, v.disputes],
                          api_visibility="private")  # fmt: skip
