"""Safe rendering of model output (and prompts) as HTML for the annotator page. No Gradio import.

Model output is untrusted: a response may contain ``<script>``, ``<img onerror=...>``, ``javascript:``
links or template syntax. ``render_markdown`` parses Markdown with markdown-it in CommonMark mode with
raw HTML *off*, so every ``<`` of the input reaches the page as ``&lt;`` (shown as text, never parsed as
a tag); link targets go through markdown-it's validator (no ``javascript:`` / ``vbscript:`` / ``file:`` /
``data:`` URLs); images are off (no requests to addresses a model chose). Then ``$ { } `` ` are
entity-encoded, so no client-side template engine (Gradio's HTML component is one) sees syntax in them.
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


def render_markdown(text: str) -> str:
    """Markdown -> HTML in which nothing from ``text`` can be markup or script."""
    return _MD.render(text or "").translate(_TEMPLATE_CHARS)


def render_conversation(messages: Sequence[Mapping[str, Any]]) -> str:
    """Chat messages -> HTML, one block per turn with its role."""
    parts = []
    for m in messages:
        role = html.escape(str(m.get("role", "?"))).translate(_TEMPLATE_CHARS)
        body = render_markdown(str(m.get("content", "")))
        parts.append(f'<div class="glmwb-turn glmwb-{role}"><div class="glmwb-role">{role}</div>{body}</div>')
    return "\n".join(parts)
