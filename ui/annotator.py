"""The annotator page: a Gradio Blocks app over a ``Store``.

Sign-in is the server's (``ui/app.py``: Gradio's sign-in form posts to its ``/login``, checked against
the store's argon2 password hashes, and the session is a row of the store's ``sessions`` table): until a
browser has signed in, every Gradio route (page config, queue, API, files) answers 401, so an
unauthenticated client can neither read an item nor submit a vote. Every handler then takes the annotator
from ``request.username`` (set by Gradio from the session cookie, never from the client's payload) and the
store refuses anything that is not that annotator's.

The page: a progress bar (votes out of the items the annotator has or can still get); the prompt, headed
"Prompt", each message with its role and turn; two (up to four) answers side by side in panels that scroll
inside themselves, with linked scrolling, rendered by ``ui.render`` (Markdown with raw HTML off: a
``<script>`` in an answer is shown as text); A / B / tie / both bad in a row fixed at the bottom of the
window, with the confirmation of the last vote beside it and, after a winner, the optional "how much
better" scale (negligibly / slightly / clearly / much: the vote's ``strength``, which the export turns into
the record's margin), which amends the vote just saved; optional 1-5 ratings per answer and attribute; an
optional rationale; skip; undo of the last vote. Keyboard: 1 = A, 2 = B, 3 = tie, 4 = both bad, s = skip,
u = undo (not while typing); the keyboard flow passes the scale by. The font stack covers Chinese.
"My votes" (``ui/history.py``) lists the annotator's votes and changes one while its item is open.
Admins also get an Admin tab: progress per annotator, the agreement report with its reading and charts,
disputed items and the item browser (``ui/admin_items.py``), task import (``ui/admin_import.py``), export,
new accounts. An export is
written to ``PageConfig.export_dir``, which Gradio never serves (it is in its blocked paths, not its allowed
ones); the tab links to ``/admin/exports/NAME``, which ``ui/app.py`` serves to admins only.

A vote's id is made when its item is shown (kept in the session's server-side state): a repeated click
stores nothing twice. Time spent is measured on the server, from showing the item to the vote.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from glmwb.annotation.agreement import agreement_curve, agreement_report, votes_over_time
from glmwb.annotation.export import export_records, write_records
from glmwb.annotation.records import STRENGTHS
from glmwb.annotation.schema import LETTERS
from glmwb.annotation.store import AnnotatorInfo, Store, StoreError, Task
from glmwb.ui.admin_import import ImportHandlers, ImportView, import_section
from glmwb.ui.admin_items import ItemsHandlers, ItemsView, items_section
from glmwb.ui.charts import line_chart
from glmwb.ui.history import HistoryHandlers, history_tab
from glmwb.ui.render import render_markdown, render_prompt

DEFAULT_GUIDELINES = """\
### How to judge

1. Read the prompt, then both answers in full.
2. Pick the answer that is **better for the person who asked**: first *correct* (a wrong final answer loses
   to any right one), then *in the prompt's language*, then *concise and clear*.
3. **Tie** when neither is better; **Both bad** when neither answers the question correctly.
   After picking a winner you may say **how much better** it is: *negligibly*, *slightly* (e.g. only
   shorter), *clearly* (e.g. the right language), *much* (e.g. the only correct one).
4. Ratings (1 = poor, 5 = excellent) and the rationale are optional, and help most when the choice was hard.
5. Unsure, or the item is broken? **Skip** it: it comes back at the end of your queue.
   A wrong click? **Undo** takes back your last vote; **My votes** changes a vote while its item is open.

Keyboard: **1** A is better · **2** B is better · **3** tie · **4** both bad · **s** skip · **u** undo.
"""

SHORTCUTS_JS = """
<script>
document.addEventListener("keydown", (event) => {
  const t = event.target;
  const typing = t && (t.isContentEditable || t.tagName === "TEXTAREA" || t.tagName === "SELECT" ||
    (t.tagName === "INPUT" && !["radio", "checkbox", "button"].includes(t.type)));
  if (typing || event.ctrlKey || event.metaKey || event.altKey) return;
  const ids = {"1": "vote-A", "2": "vote-B", "3": "vote-tie", "4": "vote-both_bad", "s": "skip", "u": "undo"};
  const button = document.getElementById(ids[event.key.toLowerCase()] || "");
  if (button && !button.disabled && button.offsetParent !== null) { event.preventDefault(); button.click(); }
});
// The answer panels scroll inside themselves, linked: scrolling one scrolls the others to the same fraction.
document.addEventListener("scroll", (event) => {
  const src = event.target;
  if (!(src instanceof Element) || !src.classList.contains("glmwb-scroll")) return;
  if (src.dataset.glmwbFollowing) { delete src.dataset.glmwbFollowing; return; }
  const range = src.scrollHeight - src.clientHeight;
  const f = range > 0 ? src.scrollTop / range : 0;
  for (const other of document.querySelectorAll(".glmwb-scroll")) {
    const top = Math.round(f * (other.scrollHeight - other.clientHeight));
    if (other !== src && other.offsetParent !== null && Math.abs(other.scrollTop - top) > 1) {
      other.dataset.glmwbFollowing = "1";
      other.scrollTop = top;
    }
  }
}, true);
</script>
"""

# Latin first, then fonts that cover Chinese (and Japanese / Korean) on Linux (Noto / Source Han, WenQuanYi),
# macOS (PingFang, Hiragino) and Windows (Microsoft YaHei): without one, Chinese text shows as empty boxes.
FONT_STACK = (
    "system-ui", "Noto Sans", "Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "PingFang SC",
    "Hiragino Sans GB", "Microsoft YaHei", "WenQuanYi Micro Hei", "sans-serif",
)  # fmt: skip
MONO_STACK = ("ui-monospace", "DejaVu Sans Mono", "Noto Sans Mono CJK SC", "monospace")
STRENGTH_WORDS = ("negligibly", "slightly", "clearly", "much")  # shown for annotation.records.STRENGTHS
RATING_VALUES = ("1", "2", "3", "4", "5")
EXPORT_NAME = re.compile(r"preferences-(majority|all)-\d{8}-\d{6}(-\d+)?\.(jsonl|parquet)")

CSS = """
.glmwb-turn { margin-bottom: 0.6em; unicode-bidi: isolate; }
.glmwb-role { font-size: 0.8em; font-weight: 600; opacity: 0.75; }
.glmwb-prompt-label { font-size: 1.1em; font-weight: 700; margin-bottom: 0.4em; }
.glmwb-prompt-body { max-height: 22vh; overflow-y: auto; border-left: 4px solid var(--color-accent);
  padding-left: 0.8em; overflow-wrap: anywhere; }
.glmwb-user { background: var(--background-fill-secondary); border-radius: 6px; padding: 0.3em 0.5em; }
.glmwb-answer { min-height: 4em; overflow-wrap: anywhere; unicode-bidi: isolate; }
.glmwb-scroll { max-height: 38vh; overflow-y: auto; overscroll-behavior: contain; }
.glmwb-progress { display: flex; align-items: center; gap: 0.6em; }
.glmwb-progress progress { flex: 1; height: 0.9em; accent-color: var(--color-accent); }
#status { min-height: 2.4em; font-weight: 600; }
#vote-row { position: fixed; bottom: 0; left: 0; right: 0; z-index: 5; padding: 0.5em 2em;
  background: var(--background-fill-primary); border-top: 1px solid var(--border-color-primary);
  box-shadow: 0 -2px 6px rgba(0, 0, 0, 0.08); }
#skip-row { margin-bottom: 9em; }  /* room to scroll past the fixed vote row */
"""


@dataclass(frozen=True)
class PageConfig:
    guidelines: str = DEFAULT_GUIDELINES
    guideline_version: str = ""  # default: the first 12 hex digits of the guidelines' SHA-256
    attributes: tuple[str, ...] = ("correctness", "helpfulness", "language")
    export_dir: Path = field(default_factory=lambda: Path("runs/annotation_exports"))
    import_dir: Path = field(
        default_factory=lambda: Path("runs/annotation_imports")
    )  # the Admin tab reads only here
    title: str = "glm-workbench · annotate"

    @property
    def version(self) -> str:
        return self.guideline_version or hashlib.sha256(self.guidelines.encode()).hexdigest()[:12]


def signed_in(store: Store, request: gr.Request) -> AnnotatorInfo:
    """The signed-in, active account of a Gradio request (every page of the workbench checks through this)."""
    username = getattr(request, "username", None)
    who = store.annotator(username) if username else None
    if who is None or not who.active or who.role == "external":
        raise gr.Error("Not signed in (or the account is disabled). Reload the page to sign in.")
    return who


@dataclass
class AnnotateView:
    """The Annotate tab's components (and the page's header and per-session state)."""

    state: gr.State  # {"assignment_id", "item_id", "letters", "uid", "shown_at"} or None
    last: gr.State  # the winner vote just saved, {"item_id", "choice"}, which the strength scale amends
    header: gr.Markdown
    progress: gr.HTML
    prompt: gr.HTML
    columns: dict[str, gr.Column]
    answers: dict[str, gr.HTML]
    ratings: dict[tuple[str, str], gr.Radio]  # (letter, attribute) -> 1-5
    strength: gr.Radio  # shown after a winner was picked
    vote_buttons: dict[str, gr.Button]  # A..D, tie, both_bad
    rationale: gr.Textbox
    skip: gr.Button
    undo: gr.Button
    status: gr.Markdown

    @property
    def task_outputs(self) -> list:
        """Every component a new task updates."""
        return [self.header, self.progress, self.prompt, self.status, self.rationale, self.strength, self.state,
                self.last, *self.answers.values(), *self.columns.values(), *self.vote_buttons.values(),
                *self.ratings.values()]  # fmt: skip


@dataclass
class AdminView:
    """The Admin tab's components (shown to admins only)."""

    tab: gr.Tab
    refresh: gr.Button
    overview: gr.Markdown
    agreement: gr.Markdown
    export_mode: gr.Radio
    export_format: gr.Radio
    export_ties: gr.Radio
    export_button: gr.Button
    export_status: gr.Markdown
    new_user: gr.Textbox
    new_password: gr.Textbox
    new_role: gr.Radio
    create: gr.Button
    create_status: gr.Markdown
    items: ItemsView
    imports: ImportView
    charts: gr.HTML


def _answer_columns(attributes: tuple[str, ...]) -> tuple[dict, dict, dict]:
    """One column per answer letter (A, B shown; C, D when an item has them) with its optional ratings."""
    columns, answers, ratings = {}, {}, {}
    with gr.Row(equal_height=False):
        for i, letter in enumerate(LETTERS):
            with gr.Column(visible=i < 2, min_width=240) as columns[letter]:
                gr.Markdown(f"#### Answer {letter}")
                answers[letter] = gr.HTML(
                    elem_id=f"answer-{letter}", elem_classes="glmwb-answer", container=True, padding=True
                )
                with gr.Accordion("Ratings (optional)", open=False):
                    for attribute in attributes:
                        ratings[letter, attribute] = gr.Radio(
                            list(RATING_VALUES), label=attribute, value=None,
                            elem_id=f"rate-{letter}-{attribute}",
                        )  # fmt: skip
    return columns, answers, ratings


def _vote_row() -> tuple[dict[str, gr.Button], gr.Markdown, gr.Radio]:
    """The vote buttons with, beside them, the confirmation of the last vote and (after a winner) the
    optional "how much better" scale."""
    with gr.Row(equal_height=False, elem_id="vote-row"):  # fixed at the bottom: on screen however long
        with gr.Column(scale=3):
            with gr.Row():
                vote_buttons = {
                    letter: gr.Button(
                        f"{letter} is better" + (f"  [{i + 1}]" if i < 2 else ""),
                        variant="primary",
                        visible=i < 2,
                        elem_id=f"vote-{letter}",
                        min_width=100,
                    )  # fmt: skip
                    for i, letter in enumerate(LETTERS)
                }
                vote_buttons["tie"] = gr.Button("Tie  [3]", elem_id="vote-tie", min_width=80)
                vote_buttons["both_bad"] = gr.Button("Both bad  [4]", elem_id="vote-both_bad", min_width=80)
        with gr.Column(scale=2):
            status = gr.Markdown(elem_id="status")
            strength = gr.Radio(
                list(zip(STRENGTH_WORDS, STRENGTHS, strict=True)), value=None, visible=False,
                label="How much better? (optional)", elem_id="strength",
            )  # fmt: skip
    return vote_buttons, status, strength


def _annotate_tab(state: gr.State, header: gr.Markdown, attributes: tuple[str, ...]) -> AnnotateView:
    progress = gr.HTML(elem_id="progress")
    prompt = gr.HTML(elem_id="prompt")
    columns, answers, ratings = _answer_columns(attributes)
    vote_buttons, status, strength = _vote_row()
    rationale = gr.Textbox(label="Rationale (optional)", lines=2, elem_id="rationale")
    with gr.Row(elem_id="skip-row"):
        skip = gr.Button("Skip  [s]", size="sm", elem_id="skip")
        undo = gr.Button("Undo last vote  [u]", size="sm", elem_id="undo")
    return AnnotateView(state, gr.State(None), header, progress, prompt, columns, answers, ratings, strength,
                        vote_buttons, rationale, skip, undo, status)  # fmt: skip


def _admin_tab(tab: gr.Tab) -> AdminView:
    refresh = gr.Button("Refresh", elem_id="admin-refresh")
    overview = gr.Markdown(elem_id="admin-overview")
    agreement = gr.Markdown(elem_id="admin-agreement")
    charts = gr.HTML(elem_id="admin-charts")
    items = items_section()
    imports = import_section()
    gr.Markdown("### Export")
    with gr.Row():
        export_mode = gr.Radio(["majority", "all"], value="majority", label="votes")
        export_format = gr.Radio(["jsonl", "parquet"], value="jsonl", label="format")
        export_ties = gr.Radio(["keep", "drop"], value="keep", label="ties")
    export_button = gr.Button("Export preferences", elem_id="admin-export")
    export_status = gr.Markdown(elem_id="admin-export-status")  # with the link to the file (admins only)
    with gr.Accordion("New account", open=False):
        new_user = gr.Textbox(label="username")
        new_password = gr.Textbox(label="password (8+ characters)", type="password")
        new_role = gr.Radio(["annotator", "admin"], value="annotator", label="role")
        create = gr.Button("Create account", elem_id="admin-create")
        create_status = gr.Markdown()
    return AdminView(tab, refresh, overview, agreement, export_mode, export_format, export_ties, export_button,
                     export_status, new_user, new_password, new_role, create, create_status, items,
                     imports, charts)  # fmt: skip


def progress_html(p: dict[str, int]) -> str:
    """A progress bar of this annotator's votes out of the items they have or could still get."""
    done = p["votes"]
    assigned = done + p["pending"] + p["skipped"] + p["available"]
    return (
        f'<div class="glmwb-progress"><progress value="{done}" max="{max(assigned, 1)}"></progress>'
        f'<span id="progress-text"><b>{done} / {assigned}</b> done</span></div>'
    )


def choice_label(choice: str, strength: str | None = None) -> str:
    """ "A is better", "A is clearly better", "a tie", "both bad"."""
    if choice in LETTERS:
        return (
            f"{choice} is {STRENGTH_WORDS[STRENGTHS.index(strength)]} better"
            if strength
            else f"{choice} is better"
        )
    return {"tie": "a tie", "both_bad": "both bad"}.get(choice, choice)


class AnnotateHandlers:
    """What the Annotate tab does: show the signed-in annotator's next task, vote, skip, undo, and the
    strength of the vote just saved."""

    def __init__(self, store: Store, config: PageConfig, view: AnnotateView) -> None:
        self.store, self.config, self.v = store, config, view

    def header_text(self, who: AnnotatorInfo, p: dict[str, int]) -> str:
        return (
            f"Signed in as **{who.username}** ({who.role}) · [sign out](logout) · "
            f"**{p['votes']}** votes · {p['available'] + p['pending']} to go"
            + (f" · {p['skipped']} skipped" if p["skipped"] else "")
        )

    def show(
        self, who: AnnotatorInfo, task: Task | None, message: str = "", last: dict | None = None
    ) -> dict:
        v = self.v
        n = len(task.letters) if task else 2
        p = self.store.progress(who)
        scale = f"How much better is {last['choice']}? (optional)" if last else "How much better? (optional)"
        out: dict = {
            v.header: self.header_text(who, p),
            v.progress: progress_html(p),
            v.status: message,
            v.rationale: gr.update(value=""),
            v.strength: gr.update(value=None, visible=last is not None, label=scale),
            v.last: last,
            **{r: gr.update(value=None) for r in v.ratings.values()},
            **{v.columns[k]: gr.update(visible=i < n) for i, k in enumerate(LETTERS)},
            **{v.vote_buttons[k]: gr.update(visible=i < n) for i, k in enumerate(LETTERS)},
        }
        if task is None:
            out[v.prompt] = "<p><b>Nothing left for you to judge. Thank you!</b></p>"
            out.update({v.answers[k]: "" for k in LETTERS})
            out[v.state] = None
            return out
        out[v.prompt] = render_prompt(task.prompt)
        for i, k in enumerate(LETTERS):
            body = render_markdown(task.responses[i]) if i < n else ""
            out[v.answers[k]] = f'<div class="glmwb-scroll" id="scroll-{k}">{body}</div>'
        out[v.state] = {
            "assignment_id": task.assignment_id,
            "item_id": task.item_id,
            "letters": list(task.letters),
            "uid": f"ui-{uuid.uuid4().hex}",
            "shown_at": time.monotonic(),
        }
        return out

    def next(self, who: AnnotatorInfo, message: str = "", last: dict | None = None) -> dict:
        return self.show(who, self.store.next_task(who), message, last)

    def vote(self, choice: str, data: dict, request: gr.Request) -> dict:
        v = self.v
        who = signed_in(self.store, request)
        current = data[v.state]
        if current is None:
            return self.next(who, "Nothing to vote on.")
        if choice in LETTERS and choice not in current["letters"]:
            raise gr.Error(f"This item has no answer {choice}.")
        given: dict[str, dict[str, int]] = {}
        for (letter, attribute), radio in v.ratings.items():
            if letter in current["letters"] and data.get(radio) in RATING_VALUES:
                given.setdefault(attribute, {})[letter] = int(data[radio])
        try:
            receipt = self.store.submit_vote(
                who, current["assignment_id"], choice, uid=current["uid"], ratings=given,
                rationale=(data.get(v.rationale) or "").strip(),
                time_spent_s=round(time.monotonic() - current["shown_at"], 3),
                guideline_version=self.config.version,
            )  # fmt: skip
        except StoreError as e:
            return self.next(who, f"Not saved: {e}")
        last = {"item_id": receipt.item_id, "choice": choice} if choice in LETTERS else None
        return self.next(who, f"Saved: item {receipt.item_id}, {choice_label(choice)}.", last)

    def amend_strength(self, strength: str | None, last: dict | None, request: gr.Request) -> dict:
        """The scale after a winner: the vote just saved becomes that vote with this strength (the store
        keeps the one before in its history)."""
        who = signed_in(self.store, request)
        if last is None or strength not in STRENGTHS:
            return {self.v.status: gr.update()}
        try:
            self.store.change_vote(who, last["item_id"], last["choice"], uid=f"ui-{uuid.uuid4().hex}",
                                   strength=strength)  # fmt: skip
        except StoreError as e:
            return {self.v.status: f"Not saved: {e}"}
        return {self.v.status: f"Saved: item {last['item_id']}, {choice_label(last['choice'], strength)}."}

    def _voter(self, choice: str):
        # a plain function per button: Gradio finds the gr.Request parameter by its annotation
        def vote(data: dict, request: gr.Request) -> dict:
            return self.vote(choice, data, request)

        return vote

    def skip(self, current: dict | None, request: gr.Request) -> dict:
        who = signed_in(self.store, request)
        message = ""
        if current is not None:
            try:
                self.store.skip(who, current["assignment_id"])
                message = f"Skipped item {current['item_id']}; it comes back at the end."
            except StoreError as e:
                message = f"Not skipped: {e}"
        return self.next(who, message)

    def undo(self, request: gr.Request) -> dict:
        who = signed_in(self.store, request)
        undone = self.store.undo_last_vote(who)
        return self.next(
            who, "Nothing to undo." if undone is None else f"Undid your vote on item {undone.item_id}."
        )

    def wire(self, page: gr.Blocks, admin_tab: gr.Tab) -> None:
        v, outputs = self.v, self.v.task_outputs

        def on_load(request: gr.Request) -> dict:
            who = signed_in(self.store, request)
            return {**self.next(who), admin_tab: gr.update(visible=who.is_admin)}

        page.load(on_load, None, [*outputs, admin_tab], api_visibility="private")
        inputs = {v.state, v.rationale, *v.ratings.values()}
        for choice, button in v.vote_buttons.items():
            button.click(self._voter(choice), inputs, outputs, api_visibility="private")
        v.strength.input(self.amend_strength, [v.strength, v.last], [v.status], api_visibility="private")
        v.skip.click(self.skip, [v.state], outputs, api_visibility="private")
        v.undo.click(self.undo, None, outputs, api_visibility="private")


def admin_charts(votes: list) -> str:
    """Votes over time per annotator, and agreement (alpha, percent agreement) as votes accrue."""
    curve = agreement_curve(votes)
    return line_chart(
        votes_over_time(votes), "Votes over time", "time (UTC)", "votes", elem_id="chart-votes"
    ) + line_chart(
        {"Krippendorff's alpha": [(n, a) for n, a, _ in curve], "percent agreement": [(n, p) for n, _, p in curve]},
        "Agreement as votes accrue", "votes so far", "agreement", y_range=(-1.0, 1.0), elem_id="chart-agreement",
    )  # fmt: skip


class AdminHandlers:
    """What the Admin tab does (every handler checks the caller is an admin): overview and agreement,
    export, new accounts."""

    def __init__(self, store: Store, config: PageConfig, view: AdminView) -> None:
        self.store, self.config, self.v = store, config, view

    def admin_only(self, request: gr.Request) -> AnnotatorInfo:
        who = signed_in(self.store, request)
        if not who.is_admin:
            raise gr.Error("Admins only.")
        return who

    def refresh(self, request: gr.Request) -> dict:
        self.admin_only(request)
        o = self.store.overview()
        lines = [
            f"**{o['votes']}** votes ({o['retracted_votes']} undone or changed) · **{o['complete_items']}** of "
            f"{o['items'] - o['gold_items']} items complete · {o['gold_items']} gold items · "
            f"{o['votes_wanted']} votes wanted on open items",
            "",
            "| annotator | role | votes | mean time (s) | last vote (UTC) |",
            "|---|---|---|---|---|",
        ]
        for a in o["annotators"]:
            lines.append(
                f"| {a['username']} | {a['role']} | {a['votes']} | {a['mean_time_s'] or ''} | "
                f"{a['last_vote'] or ''} |"
            )
        votes = self.store.votes()
        return {self.v.overview: "\n".join(lines), self.v.agreement: agreement_report(votes).to_markdown(),
                self.v.charts: admin_charts(votes)}  # fmt: skip

    def export(self, mode: str, fmt: str, ties: str, request: gr.Request) -> dict:
        self.admin_only(request)
        if mode not in ("majority", "all") or fmt not in ("jsonl", "parquet") or ties not in ("keep", "drop"):
            raise gr.Error("Choose votes, format and ties from the lists.")
        result = export_records(self.store, mode=mode, ties=ties)
        folder, stamp = Path(self.config.export_dir), time.strftime("%Y%m%d-%H%M%S")
        name, n = f"preferences-{mode}-{stamp}.{fmt}", 1
        while (folder / name).exists():
            n += 1
            name = f"preferences-{mode}-{stamp}-{n}.{fmt}"
        path = write_records(result.rows, folder / name)
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(result.skipped.items())) or "none"
        return {
            self.v.export_status: f"{len(result.rows)} rows from {result.items} items (left out: {skipped}). "
            f"Download: [{path.name}](admin/exports/{path.name})",
        }

    def create(self, username: str, password: str, role: str, request: gr.Request) -> dict:
        self.admin_only(request)
        try:
            self.store.create_annotator((username or "").strip(), password or "", role)
            message = f"Created {role} **{username.strip()}**."
        except StoreError as e:
            message = f"Not created: {e}"
        return {self.v.create_status: message, self.v.new_password: gr.update(value="")}

    def wire(self) -> None:
        v = self.v
        ItemsHandlers(self.store, v.items, self.admin_only).wire(v.refresh)
        ImportHandlers(self.store, v.imports, self.admin_only, self.config.import_dir).wire()
        v.refresh.click(self.refresh, None, [v.overview, v.agreement, v.charts], api_visibility="private")
        v.export_button.click(self.export, [v.export_mode, v.export_format, v.export_ties],
                              [v.export_status], api_visibility="private")  # fmt: skip
        v.create.click(self.create, [v.new_user, v.new_password, v.new_role], [v.create_status, v.new_password],
                       api_visibility="private")  # fmt: skip


def build_annotator_page(store: Store, config: PageConfig | None = None) -> gr.Blocks:
    """The page's Blocks; all state is explicit: the store, the config, and per-session ``gr.State``."""
    config = config or PageConfig()
    with gr.Blocks(title=config.title) as page:
        state = gr.State(None)
        header = gr.Markdown(elem_id="header")
        with gr.Tabs():
            with gr.Tab("Annotate", id="annotate"):
                annotate = _annotate_tab(state, header, config.attributes)
            with gr.Tab("My votes", id="history") as history_tab_:
                history = history_tab(history_tab_)
            with gr.Tab("Guidelines", id="guidelines"):
                gr.Markdown(config.guidelines)
                gr.Markdown(f"*Guideline version {config.version}*")
            with gr.Tab("Admin", id="admin", visible=False) as admin_tab:
                admin = _admin_tab(admin_tab)
        AnnotateHandlers(store, config, annotate).wire(page, admin_tab)
        AdminHandlers(store, config, admin).wire()
        HistoryHandlers(store, history, signed_in).wire()
    return page


def answer_text(task: Task, letter: str) -> str:
    """The raw text of one answer (tests compare what the page shows with it)."""
    return task.responses[task.letters.index(letter)]


def page_options(config: PageConfig) -> dict[str, Any]:
    """Keyword arguments for ``gr.mount_gradio_app`` that the page needs. The export folder is blocked:
    Gradio's file route never serves it (admins download through ``/admin/exports/``)."""
    return {
        "head": SHORTCUTS_JS,
        "css": CSS,
        "theme": gr.themes.Default(font=list(FONT_STACK), font_mono=list(MONO_STACK)),
        "blocked_paths": [str(Path(config.export_dir).resolve())],
    }
