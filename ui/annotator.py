"""The annotator page: a Gradio Blocks app over a ``Store``.

Sign-in is Gradio's own (``ui/app.py`` mounts this page with ``auth=`` checking the store's
argon2 password hashes): until a browser has signed in, every Gradio route (page config, queue, API, files)
answers 401, so an unauthenticated client can neither read an item nor submit a vote. Every handler then
takes the annotator from ``request.username`` (set by Gradio from the session cookie, never from the
client's payload) and the store refuses anything that is not that annotator's.

The page: guidelines; the prompt and two (up to four) answers side by side, rendered by ``ui.render``
(Markdown with raw HTML off: a ``<script>`` in an answer is shown as text); A / B / tie / both bad;
optionally how much better the pick is (negligibly / slightly / clearly / much: the vote's ``strength``,
which the export turns into the record's margin); optional 1-5 ratings per answer and attribute; an optional
rationale; skip; undo of the last vote; progress. Keyboard: 1 = A, 2 = B, 3 = tie, 4 = both bad, s = skip,
u = undo (not while typing).
Admins also get an Admin tab: progress per annotator, the agreement report, export, new accounts.

A vote's id is made when its item is shown (kept in the session's server-side state): a repeated click
stores nothing twice. Time spent is measured on the server, from showing the item to the vote.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from glmwb.annotation.agreement import agreement_report
from glmwb.annotation.export import export_records, write_records
from glmwb.annotation.records import STRENGTHS
from glmwb.annotation.schema import LETTERS
from glmwb.annotation.store import AnnotatorInfo, Store, StoreError, Task
from glmwb.ui.render import render_conversation, render_markdown

DEFAULT_GUIDELINES = """\
### How to judge

1. Read the prompt, then both answers in full.
2. Pick the answer that is **better for the person who asked**: first *correct* (a wrong final answer loses
   to any right one), then *in the prompt's language*, then *concise and clear*.
3. **Tie** when neither is better; **Both bad** when neither answers the question correctly.
   Before clicking a winner you may say **how much better** it is: *negligibly*, *slightly* (e.g. only
   shorter), *clearly* (e.g. the right language), *much* (e.g. the only correct one).
4. Ratings (1 = poor, 5 = excellent) and the rationale are optional, and help most when the choice was hard.
5. Unsure, or the item is broken? **Skip** it: it comes back at the end of your queue.
   A wrong click? **Undo** takes back your last vote.

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
</script>
"""

STRENGTH_WORDS = ("negligibly", "slightly", "clearly", "much")  # shown for annotation.records.STRENGTHS

CSS = """
.glmwb-turn { margin-bottom: 0.6em; }
.glmwb-role { font-size: 0.75em; text-transform: uppercase; opacity: 0.6; }
.glmwb-answer { min-height: 4em; overflow-wrap: anywhere; }
"""


@dataclass(frozen=True)
class PageConfig:
    guidelines: str = DEFAULT_GUIDELINES
    guideline_version: str = ""  # default: the first 12 hex digits of the guidelines' SHA-256
    attributes: tuple[str, ...] = ("correctness", "helpfulness", "language")
    export_dir: Path = field(default_factory=lambda: Path("runs/annotation_exports"))
    title: str = "glm-workbench · annotate"

    @property
    def version(self) -> str:
        return self.guideline_version or hashlib.sha256(self.guidelines.encode()).hexdigest()[:12]


def _who(store: Store, request: gr.Request) -> AnnotatorInfo:
    username = getattr(request, "username", None)
    who = store.annotator(username) if username else None
    if who is None or not who.active or who.role == "external":
        raise gr.Error("Not signed in (or the account is disabled). Reload the page to sign in.")
    return who


def build_annotator_page(store: Store, config: PageConfig | None = None) -> gr.Blocks:
    """The page's Blocks; all state is explicit: the store, the config, and per-session ``gr.State``."""
    config = config or PageConfig()
    attributes = config.attributes
    with gr.Blocks(title=config.title) as page:
        state = gr.State(None)  # {"assignment_id", "item_id", "letters", "uid", "shown_at"} or None
        header = gr.Markdown(elem_id="header")
        with gr.Tabs():
            with gr.Tab("Annotate", id="annotate"):
                prompt = gr.HTML(elem_id="prompt")
                columns, answers, ratings = {}, {}, {}
                with gr.Row(equal_height=False):
                    for i, letter in enumerate(LETTERS):
                        with gr.Column(visible=i < 2, min_width=240) as columns[letter]:
                            gr.Markdown(f"#### Answer {letter}")
                            answers[letter] = gr.HTML(
                                elem_id=f"answer-{letter}",
                                elem_classes="glmwb-answer",
                                container=True,
                                padding=True,
                            )
                            with gr.Accordion("Ratings (optional)", open=False):
                                for attribute in attributes:
                                    ratings[letter, attribute] = gr.Radio(
                                        ["1", "2", "3", "4", "5"],
                                        label=attribute,
                                        value=None,
                                        elem_id=f"rate-{letter}-{attribute}",
                                    )
                strength = gr.Radio(
                    list(zip(STRENGTH_WORDS, STRENGTHS, strict=True)),
                    value=None,
                    label="How much better is your pick? (optional; ignored for tie and both bad)",
                    elem_id="strength",
                )
                with gr.Row():
                    vote_buttons = {
                        letter: gr.Button(
                            f"{letter} is better" + (f"  [{i + 1}]" if i < 2 else ""),
                            variant="primary",
                            visible=i < 2,
                            elem_id=f"vote-{letter}",
                        )
                        for i, letter in enumerate(LETTERS)
                    }
                    vote_buttons["tie"] = gr.Button("Tie  [3]", elem_id="vote-tie")
                    vote_buttons["both_bad"] = gr.Button("Both bad  [4]", elem_id="vote-both_bad")
                rationale = gr.Textbox(label="Rationale (optional)", lines=2, elem_id="rationale")
                with gr.Row():
                    skip = gr.Button("Skip  [s]", size="sm", elem_id="skip")
                    undo = gr.Button("Undo last vote  [u]", size="sm", elem_id="undo")
                status = gr.Markdown(elem_id="status")
            with gr.Tab("Guidelines", id="guidelines"):
                gr.Markdown(config.guidelines)
                gr.Markdown(f"*Guideline version {config.version}*")
            with gr.Tab("Admin", id="admin", visible=False) as admin_tab:
                refresh = gr.Button("Refresh", elem_id="admin-refresh")
                overview = gr.Markdown(elem_id="admin-overview")
                agreement = gr.Markdown(elem_id="admin-agreement")
                with gr.Row():
                    export_mode = gr.Radio(["majority", "all"], value="majority", label="votes")
                    export_format = gr.Radio(["jsonl", "parquet"], value="jsonl", label="format")
                    export_ties = gr.Radio(["keep", "drop"], value="keep", label="ties")
                export_button = gr.Button("Export preferences", elem_id="admin-export")
                export_file = gr.File(label="export", interactive=False, elem_id="admin-export-file")
                export_status = gr.Markdown(elem_id="admin-export-status")
                with gr.Accordion("New account", open=False):
                    new_user = gr.Textbox(label="username")
                    new_password = gr.Textbox(label="password (8+ characters)", type="password")
                    new_role = gr.Radio(["annotator", "admin"], value="annotator", label="role")
                    create = gr.Button("Create account", elem_id="admin-create")
                    create_status = gr.Markdown()

        rating_list = list(ratings.values())
        task_outputs = [header, prompt, status, rationale, strength, state, *answers.values()]
        task_outputs += list(columns.values())
        task_outputs += [*vote_buttons.values(), *rating_list]

        def header_text(who: AnnotatorInfo) -> str:
            p = store.progress(who)
            return (
                f"Signed in as **{who.username}** ({who.role}) · [sign out](logout) · "
                f"**{p['votes']}** votes · {p['available'] + p['pending']} to go"
                + (f" · {p['skipped']} skipped" if p["skipped"] else "")
            )

        def show(who: AnnotatorInfo, task: Task | None, message: str = "") -> dict:
            n = len(task.letters) if task else 2
            out: dict = {
                header: header_text(who),
                status: message,
                rationale: gr.update(value=""),
                strength: gr.update(value=None),
                **{r: gr.update(value=None) for r in rating_list},
                **{columns[k]: gr.update(visible=i < n) for i, k in enumerate(LETTERS)},
                **{vote_buttons[k]: gr.update(visible=i < n) for i, k in enumerate(LETTERS)},
            }
            if task is None:
                out[prompt] = "<p><b>Nothing left for you to judge. Thank you!</b></p>"
                out.update({answers[k]: "" for k in LETTERS})
                out[state] = None
                return out
            out[prompt] = render_conversation(task.prompt)
            for i, k in enumerate(LETTERS):
                out[answers[k]] = render_markdown(task.responses[i]) if i < n else ""
            out[state] = {
                "assignment_id": task.assignment_id,
                "item_id": task.item_id,
                "letters": list(task.letters),
                "uid": f"ui-{uuid.uuid4().hex}",
                "shown_at": time.monotonic(),
            }
            return out

        def on_load(request: gr.Request) -> dict:
            who = _who(store, request)
            return {**show(who, store.next_task(who)), admin_tab: gr.update(visible=who.is_admin)}

        page.load(on_load, None, [*task_outputs, admin_tab], api_visibility="private")

        def make_vote(choice: str):
            def vote(data: dict, request: gr.Request) -> dict:
                who = _who(store, request)
                current = data[state]
                if current is None:
                    return show(who, store.next_task(who), "Nothing to vote on.")
                if choice in LETTERS and choice not in current["letters"]:
                    raise gr.Error(f"This item has no answer {choice}.")
                given: dict[str, dict[str, int]] = {}
                for (letter, attribute), radio in ratings.items():
                    if letter in current["letters"] and data.get(radio):
                        given.setdefault(attribute, {})[letter] = int(data[radio])
                try:
                    receipt = store.submit_vote(
                        who,
                        current["assignment_id"],
                        choice,
                        uid=current["uid"],
                        ratings=given,
                        strength=data.get(strength) if choice in LETTERS else None,
                        rationale=(data.get(rationale) or "").strip(),
                        time_spent_s=round(time.monotonic() - current["shown_at"], 3),
                        guideline_version=config.version,
                    )
                except StoreError as e:
                    return show(who, store.next_task(who), f"Not saved: {e}")
                label = {"tie": "a tie", "both_bad": "both bad"}.get(choice, f"{choice} is better")
                if choice in LETTERS and data.get(strength):
                    word = STRENGTH_WORDS[STRENGTHS.index(data[strength])]
                    label = f"{choice} is {word} better"
                message = f"Saved: item {receipt.item_id}, {label}."
                return show(who, store.next_task(who), message)

            return vote

        inputs = {state, rationale, strength, *rating_list}
        for choice, button in vote_buttons.items():
            button.click(make_vote(choice), inputs, task_outputs, api_visibility="private")

        def on_skip(current: dict | None, request: gr.Request) -> dict:
            who = _who(store, request)
            message = ""
            if current is not None:
                try:
                    store.skip(who, current["assignment_id"])
                    message = f"Skipped item {current['item_id']}; it comes back at the end."
                except StoreError as e:
                    message = f"Not skipped: {e}"
            return show(who, store.next_task(who), message)

        skip.click(on_skip, [state], task_outputs, api_visibility="private")

        def on_undo(request: gr.Request) -> dict:
            who = _who(store, request)
            undone = store.undo_last_vote(who)
            message = "Nothing to undo." if undone is None else f"Undid your vote on item {undone.item_id}."
            return show(who, store.next_task(who), message)

        undo.click(on_undo, None, task_outputs, api_visibility="private")

        def admin_only(request: gr.Request) -> AnnotatorInfo:
            who = _who(store, request)
            if not who.is_admin:
                raise gr.Error("Admins only.")
            return who

        def on_refresh(request: gr.Request) -> dict:
            admin_only(request)
            o = store.overview()
            lines = [
                f"**{o['votes']}** votes ({o['retracted_votes']} undone) · **{o['complete_items']}** of "
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
            report = agreement_report(store.votes())
            return {overview: "\n".join(lines), agreement: report.to_markdown()}

        refresh.click(on_refresh, None, [overview, agreement], api_visibility="private")

        def on_export(mode: str, fmt: str, ties: str, request: gr.Request) -> dict:
            admin_only(request)
            result = export_records(store, mode=mode, ties=ties)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            path = write_records(result.rows, Path(config.export_dir) / f"preferences-{mode}-{stamp}.{fmt}")
            skipped = ", ".join(f"{k} {v}" for k, v in sorted(result.skipped.items())) or "none"
            return {
                export_file: str(path),
                export_status: f"{len(result.rows)} rows from {result.items} items (left out: {skipped}).",
            }

        export_button.click(
            on_export,
            [export_mode, export_format, export_ties],
            [export_file, export_status],
            api_visibility="private",
        )

        def on_create(username: str, password: str, role: str, request: gr.Request) -> dict:
            admin_only(request)
            try:
                store.create_annotator((username or "").strip(), password or "", role)
                message = f"Created {role} **{username.strip()}**."
            except StoreError as e:
                message = f"Not created: {e}"
            return {create_status: message, new_password: gr.update(value="")}

        create.click(
            on_create,
            [new_user, new_password, new_role],
            [create_status, new_password],
            api_visibility="private",
        )
    return page


def answer_text(task: Task, letter: str) -> str:
    """The raw text of one answer (tests compare what the page shows with it)."""
    return task.responses[task.letters.index(letter)]


def page_options(config: PageConfig) -> dict[str, Any]:
    """Keyword arguments for ``gr.mount_gradio_app`` that the page needs."""
    return {
        "head": SHORTCUTS_JS,
        "css": CSS,
        "theme": gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"]),
        "allowed_paths": [str(Path(config.export_dir).resolve())],
    }
