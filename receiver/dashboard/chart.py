"""The overview's rate chart as an SVG string, drawn on the server.

No JavaScript chart library (nothing to download, nothing to build): open and
click rates as two lines over a shared time axis, message volume as small bars
underneath, and a native tooltip per period. Pure: buckets in, markup out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

WIDTH, HEIGHT = 960, 300
LEFT, RIGHT, TOP = 48, 16, 16
RATE_BOTTOM = 190  # rates plot: TOP..RATE_BOTTOM
VOL_TOP, VOL_BOTTOM = 214, 262  # volume bars
LABEL_Y = 284


@dataclass(frozen=True)
class Point:
    label: str  # on the axis ("3 Nov")
    title: str  # long name for the tooltip ("Mon 3 Nov 2025")
    sent: int
    open_rate: float | None  # 0..1, None when nothing was tracked
    click_rate: float | None
    opened: int
    clicked: int


def _x(i: int, n: int) -> float:
    span = WIDTH - LEFT - RIGHT
    return LEFT + span * (i + 0.5) / max(n, 1)


def _y(rate: float) -> float:
    return RATE_BOTTOM - (RATE_BOTTOM - TOP) * rate


def _line(points: Sequence[Point], attr: str, css: str) -> list[str]:
    """A polyline per unbroken run (a period with nothing tracked leaves a gap)."""
    out: list[str] = []
    run: list[str] = []
    dots: list[str] = []
    for i, p in enumerate(points):
        rate = getattr(p, attr)
        if rate is None:
            if len(run) > 1:
                out.append(f'<polyline class="{css}" points="{" ".join(run)}"/>')
            run = []
            continue
        x, y = _x(i, len(points)), _y(rate)
        run.append(f"{x:.1f},{y:.1f}")
        dots.append(f'<circle class="{css}" cx="{x:.1f}" cy="{y:.1f}" r="3"/>')
    if len(run) > 1:
        out.append(f'<polyline class="{css}" points="{" ".join(run)}"/>')
    return out + dots


def _pct(rate: float | None) -> str:
    return "—" if rate is None else f"{round(rate * 100)}%"


def rate_chart(points: Sequence[Point], caption: str) -> Markup:
    n = len(points)
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(caption)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(caption)}</title>",
    ]
    for pct in (0, 25, 50, 75, 100):
        y = _y(pct / 100)
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y}" y2="{y}"/>')
        parts.append(
            f'<text class="axis" x="{LEFT - 8}" y="{y + 4}" text-anchor="end">{pct}%</text>'
        )
    most = max((p.sent for p in points), default=0)
    slot = (WIDTH - LEFT - RIGHT) / max(n, 1)
    bar = max(2.0, min(28.0, slot * 0.6))
    parts.append(
        f'<text class="axis" x="{LEFT - 8}" y="{VOL_TOP + 10}" text-anchor="end">{most}</text>'
        f'<text class="axis" x="{LEFT - 8}" y="{VOL_TOP + 24}" text-anchor="end">sent</text>'
    )
    parts.append(
        f'<line class="base" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{VOL_BOTTOM}" y2="{VOL_BOTTOM}"/>'
    )
    every = max(1, -(-n // 10))  # at most ~10 labels
    for i, p in enumerate(points):
        x = _x(i, n)
        if p.sent and most:
            h = (VOL_BOTTOM - VOL_TOP) * p.sent / most
            parts.append(
                f'<rect class="vol" x="{x - bar / 2:.1f}" y="{VOL_BOTTOM - h:.1f}" '
                f'width="{bar:.1f}" height="{h:.1f}" rx="2"/>'
            )
        if (n - 1 - i) % every == 0:  # evenly spaced, ending on the latest
            parts.append(
                f'<text class="axis" x="{x:.1f}" y="{LABEL_Y}" text-anchor="middle">'
                f"{escape(p.label)}</text>"
            )
    parts += _line(points, "open_rate", "opens")
    parts += _line(points, "click_rate", "clicks")
    for i, p in enumerate(points):  # hover targets, on top
        tip = (
            f"{p.title}: {p.sent} sent · {p.opened} opened ({_pct(p.open_rate)}) · "
            f"{p.clicked} clicked ({_pct(p.click_rate)})"
        )
        parts.append(
            f'<rect class="hover" x="{_x(i, n) - slot / 2:.1f}" y="{TOP}" width="{slot:.1f}" '
            f'height="{VOL_BOTTOM - TOP}"><title>{escape(tip)}</title></rect>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - built from escaped parts only
