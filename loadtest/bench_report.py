"""Printing and saving benchmark results: the goals table, the side-by-side peers table, JSON and a PNG chart."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

Results = dict[str, dict[str, Any]]

LABELS = {
    "a": "a. submit, 1 client, one at a time",
    "a_py": "   (a through its Python client library)",
    "b": "b. submit pipelined, 100 in flight, 1 conn",
    "c": "c. SUBMIT_BATCH of 1,000 (tasks/s)",
    "d": "d. processing, 10 worker conns (tasks/s)",
    "e": "e. put->claim, waiting worker, 1,000/s",
    "f": "f. submit latency, 5,000/s offered",
    "g": "g. RSS with 100,000 pending 100-B tasks",
    "h": "h. restart with 1,000,000 live tasks",
}
# (figure, the value compared, "min" when higher is better else "max", the goal's text)
GOALS = {
    "a": ("rate", "min", ">= 0.8 x echo"),
    "b": ("rate", "min", ">= 100,000/s"),
    "d": ("rate", "min", ">= 20,000/s"),
    "e": ("p99_ms", "max", "p99 <= 1 ms"),
    "f": ("p99_ms", "max", "p99 <= 1 ms"),
    "g": ("rss_mb", "max", "<= 100 MB"),
}
GOAL_VALUES = {"b": 100_000.0, "d": 20_000.0, "e": 1.0, "f": 1.0, "g": 100.0}
# the one number per figure that the peers table and the chart compare
HEADLINE = {"a": "rate", "a_py": "rate", "b": "rate", "c": "rate", "d": "rate", "e": "p99_ms", "f": "p99_ms",
            "g": "rss_mb", "h": "restart_s"}
HIGHER_IS_BETTER = {"a", "a_py", "b", "c", "d"}


def rate(v: float) -> str:
    return f"{v:,.0f}/s"


def ms(v: float) -> str:
    return f"{v:.2f} ms" if v < 10 else f"{v:,.0f} ms"


def cell(key: str, r: dict[str, Any] | None) -> str:
    """The figure's value(s) as printed."""
    if not r:
        return "-"
    if "skipped" in r:
        return f"n/a ({r['skipped']})"
    if key in ("a", "a_py"):
        return f"{rate(r['rate'])}  p50 {ms(r['p50_ms'])} p99 {ms(r['p99_ms'])}"
    if key in ("b", "c", "d"):
        return rate(r["rate"])
    if key in ("e", "f"):
        return f"p50 {ms(r['p50_ms'])}  p99 {ms(r['p99_ms'])}" + short_of_rate(r)
    if key == "g":
        parts = (f"; broker {r['broker_process_mb']:,.0f} + database process {r['database_process_mb']:,.0f}"
                 if "database_process_mb" in r else "")
        return f"{r['rss_mb']:,.0f} MB (+{r['delta_mb']:,.0f} over idle{parts})"
    if key == "h":
        text = f"{r['restart_s']:.1f} s (kill -9)"
        if "sigterm_restart_s" in r:
            stop = f"stopped in {r['sigterm_stop_s']:.0f} s" if r.get("sigterm_exited") else "hung, killed at 60 s"
            text += f"; {r['sigterm_restart_s']:.1f} s (SIGTERM: {stop})"
        return text
    return "?"


def short_of_rate(r: dict[str, Any]) -> str:
    """A note when an open-loop figure's producer could not offer the planned rate."""
    achieved = r.get("achieved_rate")
    if achieved is None or "offered_rate" not in r or achieved >= 0.95 * r["offered_rate"]:
        return ""
    return f" (only {rate(achieved)} offered)"


def cpu(r: dict[str, Any] | None) -> str:
    if not r or "server_cpu_pct" not in r:
        return ""
    return f"{r['server_cpu_pct']:.0f}/{r['load_cpu_pct']:.0f}/{r['other_cpu_pct']:.0f}"


def vs_goal(key: str, tq: Results, echo: Results) -> tuple[str, str]:
    """(the goal's text, `ratio met|MISSED`) where a ratio > 1 is better than the goal."""
    if key not in GOALS or key not in tq or "skipped" in tq[key]:
        return ("", "")
    field, kind, text = GOALS[key]
    value = tq[key][field]
    goal = 0.8 * echo["a"]["rate"] if key == "a" and "a" in echo else GOAL_VALUES.get(key)
    if goal is None or not value or math.isnan(value):
        return (text, "")
    ratio = value / goal if kind == "min" else goal / value
    return (text, f"{ratio:.2f}x {'met' if ratio >= 1 else 'MISSED'}")


def goals_table(tq: Results, echo: Results) -> str:
    rows = [("figure", "tqbroker", "echo ceiling", "goal", "vs goal", "CPU% srv/load/other")]
    for key, label in LABELS.items():
        if key not in tq:
            continue
        goal, ratio = vs_goal(key, tq, echo)
        echo_cell = cell(key, echo.get(key)) if key in ("a", "b", "f") else ""
        rows.append((label, cell(key, tq[key]), echo_cell, goal, ratio, cpu(tq[key])))
    return _layout(rows)


def peers_table(systems: dict[str, Results]) -> str:
    """One row per figure, one column per system, and each peer's ratio tqbroker / peer (> 1: tqbroker is
    better, whichever way the figure points)."""
    names = list(systems)
    header = ["figure", *names] + [f"tq/{n}" for n in names[1:]]
    rows: list[tuple[str, ...]] = [tuple(header)]
    tq = systems[names[0]]
    for key, label in LABELS.items():
        if all(key not in res for res in systems.values()):
            continue
        cells = [short(key, systems[n].get(key)) for n in names]
        ratios = [ratio(key, tq.get(key), systems[n].get(key)) for n in names[1:]]
        rows.append((label, *cells, *ratios))
    notes = [f"  {n}: {systems[n]['_about']['text']}" for n in names if "_about" in systems[n]]
    notes.append("  *: the producer could not offer the planned rate (its achieved rate is in the JSON), so the "
                 "latency is of a lighter load")
    return _layout(rows) + ("\n" + "\n".join(notes) if notes else "")


def short(key: str, r: dict[str, Any] | None) -> str:
    if not r:
        return "-"
    if "skipped" in r:
        return "n/a"
    value = r[HEADLINE[key]]
    if key in HIGHER_IS_BETTER:
        return rate(value)
    if key in ("e", "f"):
        return f"p99 {ms(value)}" + ("*" if short_of_rate(r) else "")
    return f"{value:,.0f} MB" if key == "g" else f"{value:.1f} s"


def ratio(key: str, tq: dict[str, Any] | None, peer: dict[str, Any] | None) -> str:
    if not tq or not peer or "skipped" in tq or "skipped" in peer:
        return "-"
    a, b = tq[HEADLINE[key]], peer[HEADLINE[key]]
    if not a or not b or math.isnan(a) or math.isnan(b):
        return "-"
    mark = "*" if short_of_rate(tq) or short_of_rate(peer) else ""
    return (f"{a / b:.2f}x" if key in HIGHER_IS_BETTER else f"{b / a:.2f}x") + mark


def _layout(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def save(out_dir: Path, stamp: str, payload: dict[str, Any]) -> tuple[Path, Path | None]:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stamp}.json"
    path.write_text(json.dumps(payload, indent=1, default=str))
    systems = dict(payload["systems"])
    systems = {"tqbroker": systems.pop("tqbroker"), "echo (ceiling)": payload["echo"], **systems}
    return path, chart(out_dir / f"{stamp}.png", systems)


def chart(path: Path, systems: dict[str, Results]) -> Path | None:
    """Bars of every headline figure per system (log scale), if matplotlib is importable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = [k for k in HEADLINE if k != "a_py" and any(k in r and "skipped" not in r[k] for r in systems.values())]
    fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys), 4.2))
    for ax, key in zip(axes if len(keys) > 1 else [axes], keys, strict=True):
        names = [n for n, r in systems.items() if key in r and "skipped" not in r[key]]
        values = [systems[n][key][HEADLINE[key]] for n in names]
        ax.bar(range(len(names)), values, color=["#2b6cb0" if i == 0 else "#a0aec0" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        unit = {"rate": "per s", "p99_ms": "p99 ms", "rss_mb": "MB", "restart_s": "s"}[HEADLINE[key]]
        ax.set_title(f"{key}. {unit}\n({'higher' if key in HIGHER_IS_BETTER else 'lower'} is better)", fontsize=9)
        if values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
