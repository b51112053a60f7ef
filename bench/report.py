"""Medians, ratios, the issue's targets, and the tables (terminal and README).

Every figure is the median over the repetitions of one path on one workload;
every ratio is taken between medians from the same run.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable
from pathlib import Path as FsPath
from typing import Any

from bench.aio import KINDS, LOOPS, REFUSED, recorded_name
from bench.paths import LABELS, ORDER, PROXIES, TETHER, TETHER_HTTP, TETHER_SOCKS5

# workload -> the metrics summarised for it
METRICS: dict[str, tuple[str, ...]] = {
    "download": ("mb_s",),
    "upload": ("mb_s",),
    "rtt": ("p50_us", "p99_us", "mean_us"),
    "connrate": ("per_s", "p50_us", "p99_us", "client_cpu_us", "proxy_cpu_us"),
    "handoff": ("p50_ms", "p99_ms"),
    "memory": ("rss_kib_per_conn", "pss_kib_per_conn"),
}
# The event-loop workloads (bench/aio.py), kept per loop: "asyncio-rtt", "uvloop-rtt"...
METRICS |= {recorded_name(loop, kind): tuple(m for m in METRICS[kind] if m != "proxy_cpu_us")
            for loop in LOOPS for kind in KINDS}
AIO_PATHS = ("direct", *TETHER)

README_START = "<!-- bench:latest:start -->"
README_END = "<!-- bench:latest:end -->"


def summarise(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Median of each metric over the successful repetitions."""
    summary: dict[str, Any] = {}
    for workload, by_path in runs.items():
        if workload not in METRICS:
            continue
        for path, reps in by_path.items():
            ok = [r for r in reps if "error" not in r]
            entry: dict[str, Any] = {"reps": len(ok), "failed": len(reps) - len(ok)}
            for metric in METRICS[workload]:
                values = [float(r[metric]) for r in ok if r.get(metric) is not None]
                entry[metric] = statistics.median(values) if values else None
            if workload == "memory" and ok:
                entry["held"] = min(int(r["held"]) for r in ok)
                entry["errors"] = max(int(r["errors"]) for r in ok)
                entry["processes"] = max(int(r["processes"]) for r in ok)
            if workload.endswith("connrate") and ok:
                entry["errors"] = sum(int(r["errors"]) for r in ok)
                entry["count"] = min(int(r["count"]) for r in ok)
                entry["truncated"] = any(r.get("truncated") for r in ok)
            if len(ok) < len(reps):
                entry["error"] = next(r["error"] for r in reps if "error" in r)
            summary.setdefault(workload, {})[path] = entry
    return summary


def value(summary: dict[str, Any], workload: str, path: str, metric: str) -> float | None:
    v = summary.get(workload, {}).get(path, {}).get(metric)
    return None if v is None else float(v)


def ratios(summary: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for t in TETHER:
        row: dict[str, Any] = {}
        for workload, metric in (("download", "mb_s"), ("upload", "mb_s"), ("connrate", "per_s")):
            mine = value(summary, workload, t, metric)
            row[workload] = {
                base: _div(mine, value(summary, workload, base, metric))
                for base in ("direct", "dante")
            }
        mine = value(summary, "rtt", t, "p50_us")
        direct = value(summary, "rtt", "direct", "p50_us")
        dante = value(summary, "rtt", "dante", "p50_us")
        row["rtt_p50"] = {
            "above_direct_us": None if mine is None or direct is None else mine - direct,
            "vs_dante": _div(mine, dante),
        }
        if any(v is not None for r in row.values() for v in r.values()):
            out[t] = row
    return out


def proxy_ratios(summary: dict[str, Any], front: str = TETHER_SOCKS5) -> dict[str, Any]:
    """A Tether proxy front-end against each SOCKS5 server, in the same run.

    `front` TETHER_SOCKS5: the same client (PySocks) as the servers';
    TETHER_HTTP: a CONNECT tunnel (bench.paths.http_connect), one round
    trip per connection like SOCKS5 without authentication.

    Throughput and connection rate: Tether's over theirs (above 1 is faster);
    round trip p50: Tether's over theirs (below 1 is faster).
    """
    out: dict[str, Any] = {}
    for base in PROXIES:
        row: dict[str, Any] = {}
        for workload, metric in (("download", "mb_s"), ("upload", "mb_s"),
                                 ("rtt", "p50_us"), ("connrate", "per_s")):
            row[workload] = _div(value(summary, workload, front, metric),
                                 value(summary, workload, base, metric))
        if any(v is not None for v in row.values()):
            out[base] = row
    return out


def aio_ratios(summary: dict[str, Any]) -> dict[str, Any]:
    """Each Tether path against the same event loop direct, per loop."""
    out: dict[str, Any] = {}
    for loop in LOOPS:
        for t in TETHER:
            row: dict[str, Any] = {}
            for kind, metric in (("download", "mb_s"), ("upload", "mb_s"),
                                 ("connrate", "per_s"), ("rtt", "p50_us")):
                name = recorded_name(loop, kind)
                mine = value(summary, name, t, metric)
                direct = value(summary, name, "direct", metric)
                row[kind] = _div(mine, direct)
                if kind == "rtt":
                    row["rtt_above_direct_us"] = (
                        None if mine is None or direct is None else mine - direct)
            if any(v is not None for v in row.values()):
                out[f"{loop}/{t}"] = row
    return out


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


# -- targets (issue 6) ---------------------------------------------------------


def targets(summary: dict[str, Any], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue, per Tether path: met, missed (by how much) or n/a."""
    out: list[dict[str, Any]] = []

    def add(name: str, check: Callable[[str], tuple[bool | None, str]]) -> None:
        row: dict[str, Any] = {"target": name}
        for t in TETHER:
            met, text = check(t)
            row[t] = {"met": met, "text": text}
        out.append(row)

    def at_least(workload: str, metric: str, base: str, factor: float) -> Callable[
        [str], tuple[bool | None, str]
    ]:
        def check(t: str) -> tuple[bool | None, str]:
            mine = value(summary, workload, t, metric)
            ref = value(summary, workload, base, metric)
            if mine is None or ref is None or ref == 0:
                return None, "n/a"
            r = mine / ref
            if r >= factor:
                return True, f"met ({r:.2f}x)"
            return False, f"MISSED: {r:.2f}x, {(1 - r / factor) * 100:.0f}% short"
        return check

    for workload in ("download", "upload"):
        add(f"{workload} >= 0.45x direct", at_least(workload, "mb_s", "direct", 0.45))
        add(f"{workload} >= 1.2x Dante", at_least(workload, "mb_s", "dante", 1.2))

    def rtt_direct(t: str) -> tuple[bool | None, str]:
        mine = value(summary, "rtt", t, "p50_us")
        ref = value(summary, "rtt", "direct", "p50_us")
        if mine is None or ref is None:
            return None, "n/a"
        d = mine - ref
        if d <= 25:
            return True, f"met (+{d:.1f} us)"
        return False, f"MISSED: +{d:.1f} us, {d - 25:.1f} us over"

    def rtt_dante(t: str) -> tuple[bool | None, str]:
        mine = value(summary, "rtt", t, "p50_us")
        ref = value(summary, "rtt", "dante", "p50_us")
        if mine is None or ref is None:
            return None, "n/a"
        if mine <= ref:
            return True, f"met ({mine:.1f} <= {ref:.1f} us)"
        return False, f"MISSED: {mine:.1f} > {ref:.1f} us, {mine - ref:.1f} us over"

    add("round trip p50 <= direct + 25 us", rtt_direct)
    add("round trip p50 <= Dante's", rtt_dante)
    add("connections/s >= 1.2x Dante", at_least("connrate", "per_s", "dante", 1.2))

    want_idle = int(settings.get("idle_connections", 0))

    def memory(t: str) -> tuple[bool | None, str]:
        entry = summary.get("memory", {}).get(t)
        if not entry or entry.get("rss_kib_per_conn") is None:
            return None, "n/a"
        kib = float(entry["rss_kib_per_conn"])
        held, errors = entry.get("held", 0), entry.get("errors", 0)
        detail = f"{kib:.1f} KiB, {held} held, {errors} errors"
        if held < 5000:
            return None, f"n/a at {held} connections (needs 5000): {detail}"
        if kib <= 8 and errors == 0 and held >= want_idle:
            return True, f"met ({detail})"
        over = f"{kib - 8:.1f} KiB over" if kib > 8 else "errors"
        return False, f"MISSED: {detail}; {over}"

    add("gateway <= 8 KiB per idle connection, 5000 held, 0 errors", memory)

    def handoff(t: str) -> tuple[bool | None, str]:
        ms = value(summary, "handoff", t, "p50_ms")
        if ms is None:
            return None, "n/a"
        if ms < 2:
            return True, f"met ({ms:.2f} ms)"
        return False, f"MISSED: {ms:.2f} ms, {ms - 2:.2f} ms over"

    add("handoff p50 < 2 ms", handoff)
    return out


# -- tables --------------------------------------------------------------------


def _fmt(v: float | None, digits: int = 0, suffix: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{digits}f}{suffix}"


def table(rows: list[list[str]]) -> str:
    """A markdown table: the first row is the header; numbers right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths,
                                                                                  strict=True))]
        lines.append("| " + " | ".join(cells) + " |")
        if n == 0:
            lines.append("|" + "|".join(
                "-" * (w + 1) + ":" if i else "-" * (w + 2) for i, w in enumerate(widths)) + "|")
    return "\n".join(lines)


# (label, workload, metric, digits) of the rows every client's table has.
ROWS = [
    ("bulk download, MB/s", "download", "mb_s", 0),
    ("bulk upload, MB/s", "upload", "mb_s", 0),
    ("64 B round trip p50, us", "rtt", "p50_us", 1),
    ("64 B round trip p99, us", "rtt", "p99_us", 1),
    ("connections/s", "connrate", "per_s", 0),
    ("connect + first byte p50, us", "connrate", "p50_us", 0),
    ("  CPU per connection: client, us", "connrate", "client_cpu_us", 0),
]


def _cell(results: dict[str, Any], workload: str, path: str, metric: str, digits: int) -> str:
    """One figure of a table: its median, or why there is none."""
    if not results["paths"][path]["available"]:
        return "skipped"
    entry = results["summary"].get(workload, {}).get(path)
    if entry is None:
        return "-"
    v = entry.get(metric)
    if v is None:
        if REFUSED in entry.get("error", ""):
            return "refused"  # bench/aio.py: it did not go through the gateway
        return "error" if entry.get("error") else "-"
    text = _fmt(float(v), digits)
    if workload.endswith("connrate") and entry.get("truncated"):
        text += "+"
    return text + ("*" if entry.get("failed") else "")


def render(results: dict[str, Any]) -> str:
    summary = results["summary"]
    paths = [p for p in ORDER if p in results["paths"]]
    status = results["paths"]

    def cell(workload: str, path: str, metric: str, digits: int) -> str:
        return _cell(results, workload, path, metric, digits)

    rows = [["", *(LABELS[p] for p in paths)]]
    spec = [
        *ROWS,
        ("  CPU per connection: proxy, us", "connrate", "proxy_cpu_us", 0),
        ("proxy KiB per idle connection (RSS)", "memory", "rss_kib_per_conn", 1),
    ]
    for label, workload, metric, digits in spec:
        if workload not in summary:
            continue
        row = [label]
        for p in paths:
            if workload == "memory" and p == "direct":
                row.append("-")
            else:
                row.append(cell(workload, p, metric, digits))
        rows.append(row)
    if "memory" in summary:
        rows.append(["  idle connections held / errors", *(
            "-" if p == "direct" or p not in summary["memory"]
            else f"{summary['memory'][p].get('held', 0)} / {summary['memory'][p].get('errors', 0)}"
            for p in paths)])
    for label, metric in (("handoff p50, ms", "p50_ms"), ("handoff p99, ms", "p99_ms")):
        if "handoff" in summary:
            rows.append([label, *("-" if p not in TETHER else cell("handoff", p, metric, 2)
                                  for p in paths)])
    parts = [table(rows)] if len(rows) > 1 else []

    rat = results.get("ratios", {})
    if rat:
        rrows = [["Tether vs", "download", "upload", "round trip p50", "connections/s"]]
        for t in TETHER:
            if t not in rat:
                continue
            r = rat[t]
            rrows.append([f"{LABELS[t]} / direct",
                          _fmt(r["download"]["direct"], 2, "x"),
                          _fmt(r["upload"]["direct"], 2, "x"),
                          _signed(r["rtt_p50"]["above_direct_us"]),
                          _fmt(r["connrate"]["direct"], 2, "x")])
            rrows.append([f"{LABELS[t]} / Dante",
                          _fmt(r["download"]["dante"], 2, "x"),
                          _fmt(r["upload"]["dante"], 2, "x"),
                          _fmt(r["rtt_p50"]["vs_dante"], 2, "x"),
                          _fmt(r["connrate"]["dante"], 2, "x")])
        parts.append(table(rrows))

    for key, front in (("proxy_ratios", TETHER_SOCKS5), ("http_proxy_ratios", TETHER_HTTP)):
        prat = results.get(key, {})
        if not prat:
            continue
        prows = [[f"{LABELS[front]} vs", "download", "upload", "round trip p50",
                  "connections/s"]]
        for base, r in prat.items():
            prows.append([f"/ {LABELS[base]}", _fmt(r["download"], 2, "x"),
                          _fmt(r["upload"], 2, "x"), _fmt(r["rtt"], 2, "x"),
                          _fmt(r["connrate"], 2, "x")])
        parts.append(table(prows))

    if len(rows) > 1 and any(t in paths for t in TETHER):
        trows = [["target (issue 6)", *(LABELS[t] for t in TETHER)]]
        for row in results.get("targets", []):
            trows.append([row["target"], *(row[t]["text"] for t in TETHER)])
        parts.append(table(trows))
    parts.extend(render_aio(results))
    notes = []
    if any("*" in c for r in rows for c in r):
        notes.append("`*` some repetitions failed; see the JSON.")
    short = [f"{LABELS[p]} {e['count']} of {results['settings']['connections']}"
             for p, e in summary.get("connrate", {}).items() if e.get("truncated")]
    if short:
        notes.append("`+` the connection-rate batch hit its time budget "
                     f"({results['settings']['conn_seconds']:g} s) first: " + ", ".join(short))
    if results.get("handoff_note"):
        notes.append(f"handoff: n/a ({results['handoff_note']})")
    skipped = [f"{LABELS[p]}: {status[p]['reason']}" for p in paths if not status[p]["available"]]
    if skipped:
        notes.append("skipped: " + "; ".join(skipped))
    if notes:
        parts.append("\n".join(notes))
    return "\n\n".join(parts)


def render_aio(results: dict[str, Any]) -> list[str]:
    """The event-loop tables: each loop direct and through Tether, then the ratios."""
    summary = results["summary"]
    status = results["paths"]
    paths = [p for p in AIO_PATHS if p in status]
    loops = [loop for loop in LOOPS
             if any(recorded_name(loop, k) in summary for k in KINDS)]
    if not loops or not paths:
        return []

    rows = [["event loop, asyncio streams", *(LABELS[p] for p in paths)]]
    for loop in loops:
        for label, kind, metric, digits in ROWS:
            name = recorded_name(loop, kind)
            if name in summary:
                rows.append([f"{loop}: {label}", *(_cell(results, name, p, metric, digits)
                                                   for p in paths)])
    parts = [table(rows)]
    rat = results.get("aio_ratios", {})
    if rat:
        rrows = [["same loop, Tether vs direct", "download", "upload", "round trip p50",
                  "connections/s"]]
        for key, r in rat.items():
            loop, t = key.split("/", 1)
            rtt = "-" if r["rtt_above_direct_us"] is None else (
                f"{_signed(r['rtt_above_direct_us'])} ({_fmt(r['rtt'], 2, 'x')})")
            rrows.append([f"{LABELS[t]} / direct, {loop}", _fmt(r["download"], 2, "x"),
                          _fmt(r["upload"], 2, "x"), rtt, _fmt(r["connrate"], 2, "x")])
        parts.append(table(rrows))
    refused = sorted({f"{LABELS[p]} {name}: {e['error']}"
                      for name, by_path in summary.items() if name.split("-", 1)[0] in LOOPS
                      for p, e in by_path.items() if REFUSED in e.get("error", "")})
    if refused:
        parts.append("refused (did not go through the gateway): " + "; ".join(refused))
    return parts


def _signed(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:+.1f} us"


# -- files ---------------------------------------------------------------------


def write_json(results: dict[str, Any], directory: FsPath, stamp: str) -> FsPath:
    directory.mkdir(parents=True, exist_ok=True)
    quick = "-quick" if results["settings"].get("quick") else ""
    path = directory / f"{stamp}{quick}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def update_readme(readme: FsPath, results: dict[str, Any], table: str, json_name: str) -> None:
    meta = results["meta"]
    block = "\n".join([
        README_START,
        f"Run {meta['date']} with `{meta['command']}` "
        f"({results['settings']['reps']} repetitions, medians; pinning: {meta['pinning']}).",
        f"Machine: {meta['cpu']} x{meta['cpus']}, Linux {meta['kernel']}, "
        f"Python {meta['python']}, uvloop {meta['uvloop']}, "
        f"dante-server {meta['dante']}, microsocks {meta['microsocks']}, "
        f"PySocks {meta['pysocks']}; tether {meta['tether_commit']}. "
        f"Raw data: `bench/results/{json_name}`.",
        "",
        table,
        README_END,
    ])
    text = readme.read_text() if readme.exists() else ""
    pattern = re.compile(re.escape(README_START) + ".*?" + re.escape(README_END), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n## Latest results\n\n" + block + "\n"
    readme.write_text(text)
