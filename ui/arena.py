"""The arena: two models answer the same prompts side by side, the user votes, the vote becomes data.

    glmwb arena serve --db sqlite:///runs/annotation.db --model sft=runs/sft/model --model dpo=runs/dpo/model \\
        --endpoint big=http://127.0.0.1:8000/v1#Qwen/Qwen2.5-7B-Instruct

Sign-in is the annotator page's (``ui/app.py``: the same accounts, the same bounded sign-in checks,
Gradio's cookie; every handler takes the user from ``request.username``). Tabs:

- **Battle** (anonymous): two models drawn (by ``annotation.ratings.next_pair`` once the leaderboard has
  counted votes, else uniformly), shown as "Model A" (left) and "Model B" (right) in random order; their
  names appear only after the vote. **Named**: the user picks both.
- One prompt goes to both; the answers stream in token by token, side by side. The next prompt continues
  both conversations (multi-turn); **Regenerate** answers the last prompt again; **New battle** starts over.
- Votes: A is better / B is better / Tie / Both bad (keys 1 / 2 / 3 / 4). The server refuses a vote
  while either answer is still being written, on an empty answer, and a second vote on a battle. Each vote
  is stored with the battle
  (``annotation/arena.py``: an item of the store, closed, with the models, checkpoints, sampling, template
  hashes, display order, times, mode, and whether an identity leaked); only anonymous votes without a leak
  count for the leaderboard.
- Each user has a rate limit and a daily cap on prompts (regenerations included).
- **Leaderboard**: the Bradley-Terry fit (``annotation.ratings.fit_bt``) of the counted votes, the
  position bias, the battles still needed between neighbours, and the ratings / win-rate plot.

State shared by all sessions lives in one ``Arena`` object (models, store, live battles, limiter, the
latest fit), passed explicitly to the page builder; a session's own state is its battle id (``gr.State``).
"""

from __future__ import annotations

import queue
import random
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from glmwb.annotation.arena import ARENA_CHOICES, ArenaBattle, BattleSide, RateLimiter, draw_pair
from glmwb.annotation.store import AnnotatorInfo, Store, StoreError, VoteReceipt
from glmwb.pretrain.chat_sources import AnswerStream, ChatSource, Sampling, SourceError
from glmwb.ui.annotator import FONT_STACK, MONO_STACK, signed_in
from glmwb.ui.render import render_conversation, render_markdown

LABELS = {"A": "A is better", "B": "B is better", "tie": "Tie", "both_bad": "Both bad"}
# Keyboard: 1 = A is better, 2 = B, 3 = tie, 4 = both bad, in the tab on screen (not while typing).
SHORTCUTS_JS = """
<script>
document.addEventListener("keydown", (event) => {
  const t = event.target;
  const typing = t && (t.isContentEditable || t.tagName === "TEXTAREA" || t.tagName === "SELECT" ||
    (t.tagName === "INPUT" && !["radio", "checkbox", "button"].includes(t.type)));
  if (typing || event.ctrlKey || event.metaKey || event.altKey) return;
  const choice = {"1": "A", "2": "B", "3": "tie", "4": "both_bad"}[event.key];
  if (!choice) return;
  for (const prefix of ["anon", "named"]) {
    const button = document.getElementById(`${prefix}-vote-${choice}`);
    if (button && !button.disabled && button.offsetParent !== null) { event.preventDefault(); button.click(); return; }
  }
});
</script>
"""
CSS = """
.glmwb-turn { margin-bottom: 0.6em; }
.glmwb-role { font-size: 0.75em; text-transform: uppercase; opacity: 0.6; }
.glmwb-answer { min-height: 8em; overflow-wrap: anywhere; }
"""


@dataclass(frozen=True)
class ArenaConfig:
    sampling: Sampling = field(default_factory=Sampling)
    per_minute: int = 10  # prompts (and regenerations) per user per minute
    per_day: int = 300  # ... and per UTC day
    max_turns: int = 8  # user turns in one battle
    max_prompt_chars: int = 4000
    answer_timeout_s: float = 300.0  # a model that says nothing for this long has failed
    leaderboard_bootstrap: int = 200  # bootstrap rounds of the Leaderboard tab's fit (0: robust intervals)
    active_pairs: bool = True  # anonymous pairs by next_pair once there is a fit, else uniform
    title: str = "glm-workbench · arena"
    seed: int | None = None


@dataclass
class ArenaModel:
    source: ChatSource
    aliases: tuple[str, ...] = ()  # other names the model goes by (an answer naming one leaks it)


@dataclass
class LiveBattle:
    battle: ArenaBattle
    busy: bool = False  # a turn is being answered
    failed: str = ""  # a model's error: the battle cannot be judged
    receipt: VoteReceipt | None = None
    shown_at: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


class ArenaRefusal(Exception):
    """A request the arena turns down; the message is shown to the user."""


class Arena:
    """What every session shares. Thread-safe: Gradio runs handlers in worker threads."""

    def __init__(
        self,
        store: Store,
        models: Mapping[str, ArenaModel] | Sequence[ChatSource],
        config: ArenaConfig | None = None,
    ) -> None:
        if not isinstance(models, Mapping):
            models = {s.name: ArenaModel(s) for s in models}
        if len(models) < 2:
            raise ValueError("an arena needs at least two models")
        self.store, self.models, self.config = store, dict(models), config or ArenaConfig()
        self.limiter = RateLimiter(self.config.per_minute, self.config.per_day)
        self.rng = random.Random(self.config.seed)
        self._battles: dict[str, LiveBattle] = {}
        self._lock = threading.Lock()
        self._fit: Any = None  # the latest leaderboard (for next_pair), and the vote count it was made at
        self._fit_votes = -1
        self._board: tuple[int, str, str | None] | None = None  # (votes, the Leaderboard tab's text, plot)
        self._plots = Path(tempfile.mkdtemp(prefix="glmwb-arena-"))

    # -- battles -------------------------------------------------------------------------------------------

    def _side(self, name: str) -> BattleSide:
        source = self.models[name].source
        return BattleSide(
            name, source.checkpoint, source.chat_template_sha256, self.config.sampling.to_dict()
        )

    def new_battle(self, user: str, mode: str, picks: tuple[str, str] | None = None) -> LiveBattle:
        if mode == "named":
            if not picks or None in picks or picks[0] == picks[1]:
                raise ArenaRefusal("Pick two different models first.")
            unknown = [p for p in picks if p not in self.models]
            if unknown:
                raise ArenaRefusal(f"No model {unknown[0]!r} here.")
            left, right, prob, weight = picks[0], picks[1], None, 1.0
        else:
            with self._lock:
                left, right, prob, weight = draw_pair(sorted(self.models), self.rng, self.pair_leaderboard())
        battle = ArenaBattle(
            battle_id=uuid.uuid4().hex,
            user=user,
            mode=mode,
            left=self._side(left),
            right=self._side(right),
            aliases={n: list(self.models[n].aliases) for n in (left, right)},
            pair_prob=prob,
            weight=weight,
        )
        live = LiveBattle(battle)
        with self._lock:
            self._battles[battle.battle_id] = live
            if len(self._battles) > 10_000:  # forget the oldest (abandoned tabs)
                for key in list(self._battles)[:1000]:
                    del self._battles[key]
        return live

    def battle(self, battle_id: str | None, user: str) -> LiveBattle | None:
        live = self._battles.get(battle_id or "")
        return live if live is not None and live.battle.user == user else None

    def start_turn(self, live: LiveBattle, user: str, regenerate: bool) -> None:
        with live.lock:
            if live.receipt is not None:
                raise ArenaRefusal("This battle has its vote; start a new battle.")
            if live.busy:
                raise ArenaRefusal("Both models are still answering; wait for them to finish.")
            if live.failed:
                raise ArenaRefusal(f"A model failed ({live.failed}); start a new battle.")
            if regenerate and not live.battle.left.answer:
                raise ArenaRefusal("Nothing to regenerate yet: send a prompt first.")
            if not regenerate and live.battle.turns >= self.config.max_turns:
                raise ArenaRefusal(
                    f"A battle has at most {self.config.max_turns} turns: vote, or start anew."
                )
            refusal = self.limiter.take(user)
            if refusal:
                raise ArenaRefusal(refusal[0].upper() + refusal[1:] + ".")
            live.busy = True

    def answer(self, live: LiveBattle, prompt: str | None) -> Iterator[dict[str, str]]:
        """Send ``prompt`` (None: regenerate the last turn) to both models; yields the two answers so far,
        {"A": ..., "B": ...}, as they grow. ``start_turn`` must have succeeded."""
        b = live.battle
        try:
            for s in (b.left, b.right):
                if prompt is None:
                    s.messages.pop()  # the last answer; the last user turn stays
                    s.finish_reasons.pop()
                    if s.tokens:
                        s.tokens.pop()
                else:
                    s.messages.append({"role": "user", "content": prompt})
            if prompt is None:
                b.regenerations += 1
            streams = {
                k: self.models[s.model].source.stream(s.messages, self.config.sampling)
                for k, s in b.sides.items()
            }
            texts = dict.fromkeys(streams, "")
            for key, piece, error in _merge(streams, self.config.answer_timeout_s):
                if error is not None:
                    live.failed = error
                    texts[key] += f"\n\n*(no answer: {error})*"
                else:
                    texts[key] += piece
                yield dict(texts)
            if not live.failed:
                for k, s in b.sides.items():
                    s.messages.append({"role": "assistant", "content": streams[k].text.strip()})
                    s.finish_reasons.append(streams[k].finish_reason or "stop")
                    s.tokens.append(streams[k].tokens)
        finally:
            live.shown_at = time.monotonic()
            live.busy = False

    def vote(self, live: LiveBattle, who: AnnotatorInfo, choice: str) -> VoteReceipt:
        if choice not in ARENA_CHOICES:
            raise ArenaRefusal(f"A vote is one of {', '.join(ARENA_CHOICES)}.")
        with live.lock:
            if live.busy:
                raise ArenaRefusal("Refused: both answers must be complete before you vote.")
            if live.failed:
                raise ArenaRefusal(f"A model failed ({live.failed}); this battle cannot be judged.")
            if live.receipt is not None:
                raise ArenaRefusal("You voted on this battle already; start a new battle.")
            if not live.battle.left.messages:
                raise ArenaRefusal("Nothing to vote on yet: send a prompt first.")
            for k, side in live.battle.sides.items():  # an empty answer makes no preference pair
                if not side.answer:
                    raise ArenaRefusal(f"Model {k} gave an empty answer: regenerate, or start a new battle.")
            try:
                live.receipt = self.store.record_judged_item(
                    who,
                    live.battle.to_item(),
                    choice,
                    uid=f"arena-{live.battle.battle_id}",
                    time_spent_s=round(time.monotonic() - live.shown_at, 3),
                )
            except StoreError as e:
                raise ArenaRefusal(f"Not saved: {e}") from None
        return live.receipt

    # -- ratings -------------------------------------------------------------------------------------------

    def _counted_battles(self):
        from glmwb.annotation.ratings import battles_from_store

        return battles_from_store(self.store, arena_only=True)

    def pair_leaderboard(self) -> Any:
        """The fit that chooses anonymous pairs (robust intervals, refit when votes were added); None until
        the counted votes can be fitted (then pairs are uniform)."""
        if not self.config.active_pairs:
            return None
        from glmwb.annotation.ratings import RatingsError, fit_bt

        votes = self.store.counts()["votes"]
        if votes != self._fit_votes:
            self._fit_votes = votes
            battles = [x for x in self._counted_battles() if {x.model_a, x.model_b} <= set(self.models)]
            try:
                self._fit = fit_bt(battles, bootstrap=0) if battles else None
            except RatingsError:
                self._fit = None
        return self._fit

    def leaderboard(self) -> tuple[str, str | None]:
        """The Leaderboard tab: its text and the path of its plot (None before a fit), refit only when
        votes were added since the last time."""
        votes = self.store.counts()["votes"]
        cached = self._board
        if cached is not None and cached[0] == votes:
            return cached[1], cached[2]
        text, plot = self._leaderboard(votes)
        self._board = (votes, text, plot)
        return text, plot

    def leaderboard_markdown(self) -> str:
        return self.leaderboard()[0]

    def _leaderboard(self, votes: int) -> tuple[str, str | None]:
        from glmwb.annotation.ratings import RatingsError, adjacent_separations, fit_bt, plot_leaderboard

        battles = self._counted_battles()
        if not battles:
            return "No counted votes yet: the leaderboard fills as anonymous battles are judged.", None
        try:
            lb = fit_bt(battles, bootstrap=self.config.leaderboard_bootstrap)
        except RatingsError as e:
            return f"{len(battles)} counted votes; no fit yet ({e}).", None
        level = round(100 * lb.confidence)
        lines = [
            f"**{lb.n_battles}** counted votes · Bradley-Terry with {lb.ties} ties · {level} % intervals "
            f"({lb.interval}); a rank is 1 + the number of models whose interval lies wholly above",
            "",
            "| rank | model | rating | interval | battles | wins | losses | ties | both bad |",
            "|---:|---|---:|---|---:|---:|---:|---:|---:|",
        ]
        for r in lb.rows:
            lines.append(
                f"| {r.rank} | {r.model} | {r.rating:.0f} | {r.lower:.0f} – {r.upper:.0f} | {r.battles} | "
                f"{r.wins} | {r.losses} | {r.ties} | {r.bothbad} |"
            )
        pb = lb.position_bias
        if pb is not None:
            lines += ["", f"Position bias: the left answer's advantage is {pb.estimate:+.0f} points "
                          f"({pb.lower:+.0f} to {pb.upper:+.0f})."]  # fmt: skip
        needed = [x for x in adjacent_separations(lb) if x.votes]
        if needed:
            lines += ["", "Battles still needed to separate neighbours (at the estimated gap): " + "; ".join(
                f"{x.model_a} vs {x.model_b} about {x.votes}" for x in needed)]  # fmt: skip
        plot = None
        if len(lb.rows) >= 2:
            plot = str(plot_leaderboard(lb, battles, self._plots / f"leaderboard-{votes}.png"))
        return "\n".join(lines), plot


def _merge(streams: Mapping[str, AnswerStream], timeout_s: float) -> Iterator[tuple[str, str, str | None]]:
    """(key, piece, error) from several answer streams as they arrive (one reader thread each)."""
    q: queue.SimpleQueue = queue.SimpleQueue()

    def pump(key: str, stream: AnswerStream) -> None:
        try:
            for piece in stream:
                q.put((key, piece, None))
        except SourceError as e:
            q.put((key, "", str(e)))
        q.put((key, None, None))

    for key, stream in streams.items():
        threading.Thread(target=pump, args=(key, stream), daemon=True, name=f"arena-read-{key}").start()
    pending = set(streams)
    while pending:
        try:
            key, piece, error = q.get(timeout=timeout_s)
        except queue.Empty:
            for key in sorted(pending):
                yield key, "", f"no answer within {timeout_s:.0f} s"
            return
        if piece is None:
            pending.discard(key)
        else:
            yield key, piece, error


# ---------------------------------------------------------------------------------------------------------
# The page.
# ---------------------------------------------------------------------------------------------------------


@dataclass
class BattleView:
    """One battle tab's components; ``mode`` is "anonymous" or "named" (which has the two pickers)."""

    mode: str
    state: gr.State  # the battle id
    pickers: tuple[gr.Dropdown, gr.Dropdown] | None
    names: dict[str, gr.Markdown]
    answers: dict[str, gr.HTML]
    prompt: gr.Textbox
    send: gr.Button
    votes: dict[str, gr.Button]
    regenerate: gr.Button
    new: gr.Button
    status: gr.Markdown

    @property
    def outputs(self) -> list:
        return [self.state, self.prompt, self.status, *self.names.values(), *self.answers.values()]


def _battle_tab(mode: str, models: Sequence[str]) -> BattleView:
    p = "anon" if mode == "anonymous" else "named"
    pickers = None
    if mode == "named":
        with gr.Row():
            pickers = (
                gr.Dropdown(list(models), value=models[0], label="Model A", elem_id=f"{p}-pick-A"),
                gr.Dropdown(list(models), value=models[1], label="Model B", elem_id=f"{p}-pick-B"),
            )
    names, answers = {}, {}
    with gr.Row(equal_height=False):
        for k in ("A", "B"):
            with gr.Column(min_width=280):
                names[k] = gr.Markdown(f"#### Model {k}", elem_id=f"{p}-name-{k}")
                answers[k] = gr.HTML(
                    elem_id=f"{p}-answer-{k}", elem_classes="glmwb-answer", container=True, padding=True
                )
    with gr.Row():
        votes = {c: gr.Button(LABELS[c], variant="primary" if c in "AB" else "secondary", elem_id=f"{p}-vote-{c}")
                 for c in ARENA_CHOICES}  # fmt: skip
    with gr.Row():
        prompt = gr.Textbox(
            placeholder="Ask both models…", show_label=False, lines=2, scale=5, elem_id=f"{p}-prompt"
        )
        send = gr.Button("Send", variant="primary", scale=1, elem_id=f"{p}-send")
    with gr.Row():
        regenerate = gr.Button("Regenerate", size="sm", elem_id=f"{p}-regenerate")
        new = gr.Button("New battle", size="sm", elem_id=f"{p}-new")
    status = gr.Markdown(elem_id=f"{p}-status")
    return BattleView(
        mode, gr.State(None), pickers, names, answers, prompt, send, votes, regenerate, new, status
    )


class BattleHandlers:
    """What a battle tab does: send a prompt to both, regenerate, vote, start anew."""

    def __init__(self, arena: Arena, view: BattleView) -> None:
        self.arena, self.v = arena, view

    def _names(self, live: LiveBattle | None, reveal: bool) -> dict:
        out = {}
        for k, side in live.battle.sides.items() if live else (("A", None), ("B", None)):
            shown = side is not None and (reveal or self.v.mode == "named")
            out[self.v.names[k]] = f"#### Model {k}" + (f": {side.model}" if shown else "")
        return out

    def _stream(self, live: LiveBattle, prompt: str | None) -> Iterator[dict]:
        v, b = self.v, live.battle
        # what each model answers: its conversation so far and the new prompt (or, to regenerate, without
        # its last answer)
        history = {
            k: s.messages + [{"role": "user", "content": prompt}] if prompt is not None else s.messages[:-1]
            for k, s in b.sides.items()
        }
        yield {v.state: b.battle_id, v.prompt: "", v.status: "Both models are answering…",
               **self._names(live, reveal=False),
               **{v.answers[k]: render_conversation(h) for k, h in history.items()}}  # fmt: skip
        last = 0.0
        partial = {"A": "", "B": ""}
        for partial in self.arena.answer(live, prompt):
            if time.monotonic() - last >= 0.05:  # at most 20 screen updates a second
                last = time.monotonic()
                yield {v.answers[k]: self._render(history[k], partial[k]) for k in ("A", "B")}
        done = not live.failed
        status = f"A model failed: {live.failed}"
        if done:
            status = (f"Turn {b.turns}{' again' if prompt is None else ''}: both answered. Vote, or send the next "
                      "prompt to both.")  # fmt: skip
            if b.mode == "anonymous" and b.leaks():  # the user sees the names anyway; say what it means
                status += (
                    " A model's name came up in this battle, so its vote will be stored but not counted."
                )
        yield {
            **{v.answers[k]: render_conversation(s.messages) if done else self._render(history[k], partial[k])
               for k, s in b.sides.items()},
            v.status: status,
        }  # fmt: skip

    @staticmethod
    def _render(history: list[dict], partial: str) -> str:
        return render_conversation(history) + (
            f'<div class="glmwb-turn glmwb-assistant"><div class="glmwb-role">assistant</div>'
            f"{render_markdown(partial)}</div>"
        )

    def send(
        self, prompt: str, battle_id: str | None, pick_a: str | None, pick_b: str | None, request: gr.Request
    ):
        v = self.v
        who = signed_in(self.arena.store, request)
        text = (prompt or "").strip()
        try:
            if not text:
                raise ArenaRefusal("Type a prompt first.")
            if len(text) > self.arena.config.max_prompt_chars:
                raise ArenaRefusal(f"A prompt has at most {self.arena.config.max_prompt_chars} characters.")
            live = self.arena.battle(battle_id, who.username)
            picks = (pick_a, pick_b) if v.mode == "named" else None
            if (
                live is None
                or live.receipt is not None
                or (picks and picks != (live.battle.left.model, live.battle.right.model))
            ):
                live = self.arena.new_battle(who.username, v.mode, picks)
            self.arena.start_turn(live, who.username, regenerate=False)
        except ArenaRefusal as e:
            yield {v.status: str(e)}
            return
        yield from self._stream(live, text)

    def regenerate(self, battle_id: str | None, request: gr.Request):
        v = self.v
        who = signed_in(self.arena.store, request)
        live = self.arena.battle(battle_id, who.username)
        try:
            if live is None:
                raise ArenaRefusal("Nothing to regenerate yet: send a prompt first.")
            self.arena.start_turn(live, who.username, regenerate=True)
        except ArenaRefusal as e:
            yield {v.status: str(e)}
            return
        yield from self._stream(live, None)

    def vote(self, choice: str, battle_id: str | None, request: gr.Request) -> dict:
        v = self.v
        who = signed_in(self.arena.store, request)
        live = self.arena.battle(battle_id, who.username)
        try:
            if live is None:
                raise ArenaRefusal("Nothing to vote on yet: send a prompt first.")
            receipt = self.arena.vote(live, who, choice)
        except ArenaRefusal as e:
            return {v.status: str(e)}
        b = live.battle
        leaks = b.leaks()
        if b.mode == "named":
            counted = "a named battle, so it does not count for the leaderboard"
        elif leaks:
            counted = f"stored but not counted: {'; '.join(leaks)}"
        else:
            counted = "counted for the leaderboard"
        return {
            **self._names(live, reveal=True),
            v.status: f"Saved: {LABELS[choice]} (vote {receipt.vote_id}, {counted}). "
            f"A was **{b.left.model}**, B was **{b.right.model}**. Send a prompt for a new battle.",
        }

    def _voter(self, choice: str):
        def vote(battle_id: str | None, request: gr.Request) -> dict:
            return self.vote(choice, battle_id, request)

        return vote

    def new(self, request: gr.Request) -> dict:
        signed_in(self.arena.store, request)
        v = self.v
        return {v.state: None, v.prompt: "", v.status: "New battle: send a prompt.",
                **self._names(None, reveal=False), **{a: "" for a in v.answers.values()}}  # fmt: skip

    def wire(self) -> None:
        v = self.v
        pickers = list(v.pickers) if v.pickers else [gr.State(None), gr.State(None)]
        send_inputs = [v.prompt, v.state, *pickers]
        v.send.click(self.send, send_inputs, v.outputs, api_visibility="private")
        v.prompt.submit(self.send, send_inputs, v.outputs, api_visibility="private")
        v.regenerate.click(self.regenerate, [v.state], v.outputs, api_visibility="private")
        for choice, button in v.votes.items():
            button.click(
                self._voter(choice), [v.state], [v.status, *v.names.values()], api_visibility="private"
            )
        v.new.click(self.new, None, v.outputs, api_visibility="private")


def build_arena_page(arena: Arena) -> gr.Blocks:
    """The arena's Blocks (all state explicit: the ``Arena`` and per-session ``gr.State``)."""
    models = sorted(arena.models)
    with gr.Blocks(title=arena.config.title) as page:
        header = gr.Markdown(elem_id="header")
        with gr.Tabs():
            with gr.Tab("Battle", id="battle"):
                gr.Markdown("Two anonymous models answer your prompt. Vote for the better answer; their names "
                            "show after your vote. Naming a model in your prompt makes the vote not count.")  # fmt: skip
                anonymous = _battle_tab("anonymous", models)
            with gr.Tab("Named", id="named"):
                named = _battle_tab("named", models)
            with gr.Tab("Leaderboard", id="leaderboard"):
                refresh = gr.Button("Refresh", size="sm", elem_id="leaderboard-refresh")
                board = gr.Markdown(elem_id="leaderboard")
                plot = gr.Image(label="ratings and win rates", type="filepath", interactive=False,
                                elem_id="leaderboard-plot")  # fmt: skip
        for view in (anonymous, named):
            BattleHandlers(arena, view).wire()

        def on_load(request: gr.Request) -> str:
            who = signed_in(arena.store, request)
            return f"Signed in as **{who.username}** · [sign out](logout) · {len(models)} models"

        def on_refresh(request: gr.Request) -> dict:
            signed_in(arena.store, request)
            text, path = arena.leaderboard()
            return {board: text, plot: gr.update(value=path, visible=path is not None)}

        page.load(on_load, None, header, api_visibility="private")
        page.load(on_refresh, None, [board, plot], api_visibility="private")  # a fit may take a moment
        refresh.click(on_refresh, None, [board, plot], api_visibility="private")
    return page


def page_options() -> dict[str, Any]:
    return {
        "head": SHORTCUTS_JS,
        "css": CSS,
        "theme": gr.themes.Default(font=list(FONT_STACK), font_mono=list(MONO_STACK)),  # covers Chinese
    }


def create_arena_app(store: Store, arena: Arena, settings=None):
    """The JSON API of the store (sign-in, health) with the arena page mounted at ``/`` behind the
    annotator page's sign-in and protections (``ui/app.py``; ``settings``: its ``ServerSettings``)."""
    import os

    from glmwb.ui.app import ServerSettings, mount_page

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    page = build_arena_page(arena)
    page.queue(default_concurrency_limit=32)
    return mount_page(page, store, settings or ServerSettings(), **page_options())
