"""Small line charts as inline SVG, made on the server (no JavaScript, nothing fetched from elsewhere): the
admin's votes over time per annotator and agreement as votes accrue. Every label is escaped."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from datetime import datetime

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")
W, H, LEFT, RIGHT, TOP, BOTTOM = 640, 260, 56, 150, 28, 40


def _x(value: float | datetime) -> float:
    return value.timestamp() if isinstance(value, datetime) else float(value)


def _label(value: float, as_time: bool) -> str:
    if as_time:
        return datetime.fromtimestamp(value).strftime("%m-%d %H:%M")
    return f"{value:g}" if abs(value) >= 1 or value == 0 else f"{value:.2f}"


def line_chart(
    series: Mapping[str, Sequence[tuple[float | datetime, float]]],
    title: str,
    x_label: str,
    y_label: str,
    y_range: tuple[float, float] | None = None,
    elem_id: str = "",
) -> str:
    """One polyline (with point markers) per named series; NaN points are left out. An empty chart says
    so instead of drawing axes."""
    clean = {name: [(_x(x), y) for x, y in pts if not math.isnan(y)] for name, pts in series.items()}
    clean = {name: pts for name, pts in clean.items() if pts}
    head = f'<svg xmlns="http://www.w3.org/2000/svg" class="glmwb-chart" id="{html.escape(elem_id)}" ' \
           f'width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="{html.escape(title)}">' \
           f'<text x="{LEFT}" y="16" font-weight="bold" font-size="13">{html.escape(title)}</text>'  # fmt: skip
    if not clean:
        return head + f'<text x="{LEFT}" y="{H // 2}" font-size="12">nothing to draw yet</text></svg>'
    as_time = any(isinstance(x, datetime) for pts in series.values() for x, _ in pts)
    xs = [x for pts in clean.values() for x, _ in pts]
    ys = [y for pts in clean.values() for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = y_range or (min(0.0, min(ys)), max(ys))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return TOP + (1 - (y - y0) / (y1 - y0)) * ph

    parts = [
        head,
        f'<line x1="{LEFT}" y1="{TOP + ph}" x2="{LEFT + pw}" y2="{TOP + ph}" stroke="#888"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + ph}" stroke="#888"/>',
        f'<text x="{LEFT - 6}" y="{TOP + 4}" text-anchor="end" font-size="11">{_label(y1, False)}</text>',
        f'<text x="{LEFT - 6}" y="{TOP + ph}" text-anchor="end" font-size="11">{_label(y0, False)}</text>',
        f'<text x="{LEFT}" y="{TOP + ph + 14}" font-size="11">{_label(x0, as_time)}</text>',
        f'<text x="{LEFT + pw}" y="{TOP + ph + 14}" text-anchor="end" font-size="11">{_label(x1, as_time)}</text>',
        f'<text x="{LEFT + pw / 2}" y="{H - 6}" text-anchor="middle" font-size="11">{html.escape(x_label)}</text>',
        f'<text x="12" y="{TOP + ph / 2}" font-size="11" transform="rotate(-90 12 {TOP + ph / 2})" '
        f'text-anchor="middle">{html.escape(y_label)}</text>',
    ]
    for i, (name, pts) in enumerate(sorted(clean.items())):
        color = COLORS[i % len(COLORS)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        parts.append(f'<polyline class="glmwb-series" data-name="{html.escape(name)}" points="{coords}" '
                     f'fill="none" stroke="{color}" stroke-width="2"/>')  # fmt: skip
        parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}"/>' for x, y in pts]
        ly = TOP + 14 * i + 6
        parts.append(f'<rect x="{LEFT + pw + 12}" y="{ly - 8}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{LEFT + pw + 26}" y="{ly + 1}" font-size="11">{html.escape(name)}</text>')  # fmt: skip
    return "".join(parts) + "</svg>"
