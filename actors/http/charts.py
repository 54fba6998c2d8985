"""Server-side SVG charts for the dashboard, from rows the history query returned.

Pure functions: rows in, an SVG string out (Jinja2 marks it safe). Every label is escaped.
"""

from __future__ import annotations

from html import escape
from typing import Any

WIDTH, HEIGHT, PAD = 720, 180, 28


def throughput_svg(rows: list[list[Any]], minutes: int, now_minute: int) -> str:
    """Stacked bars per minute: completed (green) and failed (red) over the last `minutes`.

    `rows` are [minute (unix seconds // 60), completed, failed]; minutes without a row are zero.
    """
    by_minute = {int(r[0]): (int(r[1] or 0), int(r[2] or 0)) for r in rows}
    series = [by_minute.get(now_minute - minutes + 1 + i, (0, 0)) for i in range(minutes)]
    top = max([c + f for c, f in series] + [1])
    bar = (WIDTH - 2 * PAD) / minutes
    scale = (HEIGHT - 2 * PAD) / top
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
             f'aria-label="tasks finished per minute, last {minutes} minutes">',
             f'<text x="{PAD}" y="16" class="label">max {top}/min</text>']
    for i, (completed, failed) in enumerate(series):
        x = PAD + i * bar
        h_ok, h_fail = completed * scale, failed * scale
        base = HEIGHT - PAD
        if completed:
            parts.append(f'<rect class="ok" x="{x:.1f}" y="{base - h_ok:.1f}" width="{bar * 0.9:.1f}" '
                         f'height="{h_ok:.1f}"><title>{completed} completed</title></rect>')
        if failed:
            parts.append(f'<rect class="fail" x="{x:.1f}" y="{base - h_ok - h_fail:.1f}" width="{bar * 0.9:.1f}" '
                         f'height="{h_fail:.1f}"><title>{failed} failed</title></rect>')
    parts.append(f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" class="axis"/>')
    parts.append(f'<text x="{PAD}" y="{HEIGHT - 8}" class="label">-{minutes} min</text>')
    parts.append(f'<text x="{WIDTH - PAD}" y="{HEIGHT - 8}" class="label" text-anchor="end">now</text></svg>')
    return "".join(parts)


def runtime_svg(rows: list[list[Any]]) -> str:
    """Horizontal bars per kind: p50 (dark) inside p99 (light), in milliseconds.

    `rows` are [kind, p50_ms, p99_ms, count], at most a screenful (the query limits them).
    """
    if not rows:
        return '<p class="muted">no finished runs in this window</p>'
    top = max(float(r[2] or 0) for r in rows) or 1.0
    row_h, label_w = 22, 200
    height = row_h * len(rows) + 10
    width = WIDTH - label_w - 190  # room for the figures after the longest bar
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {height}" role="img" aria-label="run time by kind">']
    for i, (kind, p50, p99, count) in enumerate(rows):
        y = 5 + i * row_h
        w50, w99 = float(p50 or 0) / top * width, float(p99 or 0) / top * width
        name = escape(str(kind)[:40])
        parts.append(f'<text x="0" y="{y + 14}" class="label">{name}</text>')
        parts.append(f'<rect class="p99" x="{label_w}" y="{y}" width="{w99:.1f}" height="16">'
                     f'<title>p99 {float(p99 or 0):.1f} ms</title></rect>')
        parts.append(f'<rect class="p50" x="{label_w}" y="{y + 4}" width="{w50:.1f}" height="8">'
                     f'<title>p50 {float(p50 or 0):.1f} ms</title></rect>')
        parts.append(f'<text x="{label_w + w99 + 4:.1f}" y="{y + 13}" class="label">'
                     f'{float(p50 or 0):.1f} / {float(p99 or 0):.1f} ms ({int(count)})</text>')
    parts.append("</svg>")
    return "".join(parts)
