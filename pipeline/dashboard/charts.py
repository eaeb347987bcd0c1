"""Inline SVG charts (no JavaScript, nothing fetched): grouped bars and lines over labelled x values.

Every chart is `CHART_WIDTH` px wide so that four fit side by side in a 1280 px page. Values may be
None (a metric undefined on a slice, a day without a run): bars are left out, lines break.
"""

from __future__ import annotations

import html
import math
from typing import Dict, List, Optional, Sequence, Tuple

CHART_WIDTH, CHART_HEIGHT = 300, 210
# Colour-blind-safe palette (Okabe and Ito), one colour per series in order.
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000")
_LEFT, _RIGHT, _TOP, _BOTTOM = 44, 8, 24, 58   # plot margins: axis labels, title, x labels and legend

Series = Dict[str, Sequence[Optional[float]]]


def _finite(values) -> List[float]:
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def _y_range(series: Series, reference: Optional[float], from_zero: bool = False) -> Tuple[float, float]:
    values = _finite(v for vs in series.values() for v in vs)
    values += [reference] if reference is not None else []
    values += [0.0] if from_zero else []
    if not values:
        return 0.0, 1.0
    low, high = min(values), max(values)
    pad = (high - low) * 0.08 or abs(high) * 0.1 or 0.05
    return (low if from_zero and low == 0 else low - pad), high + pad


def _tick_label(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value / 1000:.3g}k"
    return f"{value:.3g}"


def _ticks(low: float, high: float, count: int = 4) -> List[float]:
    step = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(step))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= step)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


class _Frame:
    """Maps data to pixels and draws the frame: title, y axis with ticks, reference line, legend."""

    def __init__(self, title: str, series: Series, reference: Optional[float], y_label: str,
                 from_zero: bool = False):
        self.low, self.high = _y_range(series, reference, from_zero)
        self.x0, self.x1 = _LEFT, CHART_WIDTH - _RIGHT
        self.y0, self.y1 = CHART_HEIGHT - _BOTTOM, _TOP
        self.parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{CHART_WIDTH}" '
                      f'height="{CHART_HEIGHT}" viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" role="img" '
                      f'aria-label="{html.escape(title)}">',
                      f'<text x="{CHART_WIDTH / 2}" y="15" text-anchor="middle" class="title">{html.escape(title)}</text>']
        for tick in _ticks(self.low, self.high):
            y = self.y(tick)
            self.parts.append(f'<line x1="{self.x0}" x2="{self.x1}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                              f'<text x="{self.x0 - 4}" y="{y + 3:.1f}" text-anchor="end">{_tick_label(tick)}</text>')
        if reference is not None:
            y = self.y(reference)
            self.parts.append(f'<line x1="{self.x0}" x2="{self.x1}" y1="{y:.1f}" y2="{y:.1f}" class="reference"/>')
        self.parts.append(f'<text transform="translate(11 {(self.y0 + self.y1) / 2}) rotate(-90)" '
                          f'text-anchor="middle">{html.escape(y_label)}</text>')
        self.parts.append(f'<line x1="{self.x0}" x2="{self.x0}" y1="{self.y1}" y2="{self.y0}" class="axis"/>'
                          f'<line x1="{self.x0}" x2="{self.x1}" y1="{self.y0}" y2="{self.y0}" class="axis"/>')

    def y(self, value: float) -> float:
        return self.y0 - (value - self.low) / (self.high - self.low) * (self.y0 - self.y1)

    def x_labels(self, labels: Sequence[str], centres: Sequence[float]) -> None:
        every = max(1, math.ceil(len(labels) / 6))  # at most about six labels fit under the axis
        for i, (label, x) in enumerate(zip(labels, centres)):
            if i % every == 0 or i == len(labels) - 1:
                self.parts.append(f'<text x="{x:.1f}" y="{self.y0 + 13}" text-anchor="middle">'
                                  f'{html.escape(label)}</text>')

    def legend(self, names: Sequence[str]) -> None:
        x, y = self.x0, self.y0 + 30
        for i, name in enumerate(names):
            width = 24 + 6.2 * len(name)
            if x + width > CHART_WIDTH and x > self.x0:
                x, y = self.x0, y + 13
            self.parts.append(f'<rect x="{x}" y="{y - 8}" width="9" height="9" fill="{PALETTE[i % len(PALETTE)]}"/>'
                              f'<text x="{x + 12}" y="{y}">{html.escape(name)}</text>')
            x += width

    def svg(self) -> str:
        return "".join(self.parts) + "</svg>"


def bar_chart(title: str, categories: Sequence[str], series: Series, y_label: str = "",
              reference: Optional[float] = None) -> str:
    """Grouped bars: one group per category, one bar per series in it."""
    frame = _Frame(title, series, reference, y_label, from_zero=True)
    slot = (frame.x1 - frame.x0) / max(1, len(categories))
    width = slot * 0.8 / max(1, len(series))
    for s, values in enumerate(series.values()):
        for c, value in enumerate(values):
            if not _finite([value]):
                continue
            top, base = frame.y(value), frame.y(max(frame.low, min(frame.high, 0.0)))
            x = frame.x0 + c * slot + slot * 0.1 + s * width
            frame.parts.append(f'<rect x="{x:.1f}" y="{min(top, base):.1f}" width="{width:.1f}" '
                               f'height="{abs(base - top):.1f}" fill="{PALETTE[s % len(PALETTE)]}">'
                               f'<title>{html.escape(f"{categories[c]}, {list(series)[s]}: {value:.4f}")}</title></rect>')
    frame.x_labels(categories, [frame.x0 + (c + 0.5) * slot for c in range(len(categories))])
    frame.legend(list(series))
    return frame.svg()


def line_chart(title: str, x_labels: Sequence[str], series: Series, y_label: str = "",
               reference: Optional[float] = None) -> str:
    """One line per series over the x labels (evenly spaced), with a dot per value."""
    frame = _Frame(title, series, reference, y_label)
    step = (frame.x1 - frame.x0 - 16) / max(1, len(x_labels) - 1)
    xs = [frame.x0 + 8 + i * step if len(x_labels) > 1 else (frame.x0 + frame.x1) / 2 for i in range(len(x_labels))]
    for s, (name, values) in enumerate(series.items()):
        colour = PALETTE[s % len(PALETTE)]
        points = list(zip(xs, x_labels, values))
        segment: List[str] = []
        for x, label, value in points + [(None, None, None)]:
            if x is not None and _finite([value]):
                segment.append(f"{x:.1f},{frame.y(value):.1f}")
                frame.parts.append(f'<circle cx="{x:.1f}" cy="{frame.y(value):.1f}" r="2.5" fill="{colour}">'
                                   f'<title>{html.escape(f"{label}, {name}: {value:.4f}")}</title></circle>')
                continue
            if len(segment) > 1:
                frame.parts.append(f'<polyline points="{" ".join(segment)}" fill="none" stroke="{colour}" '
                                   f'stroke-width="1.5"/>')
            segment = []
    frame.x_labels(x_labels, xs)
    frame.legend(list(series))
    return frame.svg()
