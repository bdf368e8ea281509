"""Safe rendering of model output (and prompts) as HTML for the annotator page. No Gradio import.

Model output is untrusted: a response may contain ``<script>``, ``<img onerror=...>``, ``javascript:``
links or template syntax. ``render_markdown`` parses Markdown with markdown-it in CommonMark mode with
raw HTML *off*, so every ``<`` of the input reaches the page as ``&lt;`` (shown as text, never parsed as
a tag); link targets go through markdown-it's validator (no ``javascript:`` / ``vbscript:`` / ``file:`` /
``data:`` URLs); images are off (no requests to addresses a model chose). Then ``$ { } `` ` are
entity-encoded, so no client-side template engine (Gradio's HTML component is one) sees syntax in them.

Bidirectional controls (embeddings, overrides, isolates, and the LRM / RLM / ALM marks) would let a text
show something other than what it holds: ``"7 + 5 = \u202e21\u202c"`` displays as "7 + 5 = 12". Each is
replaced, before parsing, by a visible marker naming it (``⟦U+202E RLO⟧``), so annotators see and judge the
stored characters; the page also isolates each answer's direction (``unicode-bidi: isolate``).
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from markdown_it import MarkdownIt

_MD = (
    MarkdownIt("commonmark", {"html": False, "breaks": True, "linkify": False, "typographer": False})
    .enable(["table", "strikethrough"])
    .disable("image")
)
_TEMPLATE_CHARS = str.maketrans({"$": "&#36;", "{": "&#123;", "}": "&#125;", "`": "&#96;"})
BIDI_CONTROLS = {
    "\u061c": "ALM", "\u200e": "LRM", "\u200f": "RLM",
    "\u202a": "LRE", "\u202b": "RLE", "\u202c": "PDF", "\u202d": "LRO", "\u202e": "RLO",
    "\u2066": "LRI", "\u2067": "RLI", "\u2068": "FSI", "\u2069": "PDI",
}  # fmt: skip
_BIDI_MARKERS = str.maketrans({c: f"\u27e6U+{ord(c):04X} {name}\u27e7" for c, name in BIDI_CONTROLS.items()})


def show_controls(text: str) -> str:
    """``text`` with every bidirectional control replaced by a visible marker (``⟦U+202E RLO⟧``)."""
    return text.translate(_BIDI_MARKERS)


def render_markdown(text: str) -> str:
    """Markdown -> HTML in which nothing from ``text`` can be markup or script."""
    return _MD.render(show_controls(text or "")).translate(_TEMPLATE_CHARS)


def render_conversation(messages: Sequence[Mapping[str, Any]]) -> str:
    """Chat messages -> HTML, one block per turn with its role."""
    parts = []
    for m in messages:
        role = html.escape(show_controls(str(m.get("role", "?")))).translate(_TEMPLATE_CHARS)
        body = render_markdown(str(m.get("content", "")))
        parts.append(f'<div class="glmwb-turn glmwb-{role}"><div class="glmwb-role">{role}</div>{body}</div>')
    return "\n".join(parts)


def render_prompt(messages: Sequence[Mapping[str, Any]]) -> str:
    """The prompt as the annotator page shows it: headed "Prompt", one block per message with its role and,
    for a multi-turn prompt, its turn (a user message starts a turn): "User · turn 2"."""
    parts, turn = [], 0
    multi = sum(str(m.get("role")) == "user" for m in messages) > 1 or len(messages) > 2
    for m in messages:
        role = str(m.get("role", "?"))
        turn += role == "user"
        label = role.capitalize() + (f" · turn {max(turn, 1)}" if multi and role != "system" else "")
        label = html.escape(show_controls(label)).translate(_TEMPLATE_CHARS)
        css = html.escape(show_controls(role)).translate(_TEMPLATE_CHARS)
        body = render_markdown(str(m.get("content", "")))
        parts.append(f'<div class="glmwb-turn glmwb-{css}"><div class="glmwb-role">{label}</div>{body}</div>')
    count = f" ({len(messages)} messages)" if multi else ""
    return f'<div class="glmwb-prompt-label">Prompt{count}</div><div class="glmwb-prompt-body">{"".join(parts)}</div>'
