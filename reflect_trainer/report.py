"""One self-contained HTML page about a recycled data set: counts, length changes, IFD histograms, and the pairs
before and after with word-level differences.

The page has no script and loads nothing (inline CSS and SVG only), so it renders offline and can be attached to an
issue. Every piece of data text is HTML-escaped: a recycled data set is oracle output over untrusted data. Elements
that carry a count have ``id="count-<key>"`` and ``data-count="<key>"``, with keys from :func:`summary_counts`.
"""

from __future__ import annotations

import difflib
import html
import math
import re
import statistics
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from .formats import sharegpt_as_chat
from . import schema
from .schema import (INSTRUCTION_REFLECTION, PASSED_THROUGH, RECYCLED_OUTPUT, REFLECTED_OUTPUT, RESPONSE_REFLECTION,
                     RESPONSE_REFLECTION_OF_ORIGINAL, VERSIONS)
from .text import request_text, word_count

_LABELS = {
    INSTRUCTION_REFLECTION: "instruction reflection (q)",
    RESPONSE_REFLECTION: "response reflection (qa; of the original in response mode)",
    RESPONSE_REFLECTION_OF_ORIGINAL: "response reflection of the original (a, selective mode)",
}
#: Reflection phases a recycled row can carry: ``(key, label, raw column, fallback column)``.
PHASES = tuple((phase, label, schema.raw_column(phase), schema.fallback_column(phase)) for phase, label in
               _LABELS.items())
#: Per phase: the column with why the oracle stopped, and the (new, replaced) answer columns of an accepted rewrite.
PHASE_DETAILS = {
    INSTRUCTION_REFLECTION: (schema.finish_column(INSTRUCTION_REFLECTION), REFLECTED_OUTPUT, "output"),
    RESPONSE_REFLECTION: (schema.finish_column(RESPONSE_REFLECTION), RECYCLED_OUTPUT, None),
    RESPONSE_REFLECTION_OF_ORIGINAL: (schema.finish_column(RESPONSE_REFLECTION_OF_ORIGINAL), "a_output", "output"),
}
EXAMPLES_PER_REASON = 2
#: Score kinds: ``(column prefix, label)``; columns are ``<prefix>_<version>``.
SCORES = (("ifd", "IFD = PPL(A|Q) / PPL(A)"), ("rifd", "reverse-IFD = PPL(Q|A) / PPL(Q)"))
DROPPED = "dropped"  # selection key of rows whose ``selected_version`` is None

_e = html.escape  # quote=True by default: safe in text and in attribute values


# ---------------------------------------------------------------------------------------------------------------------
# Reading rows (tolerant: the report must describe broken rows, not fail on them)
# ---------------------------------------------------------------------------------------------------------------------


def _as_rows(data: Any) -> list[dict[str, Any]]:
    return data.to_list() if hasattr(data, "to_list") else [dict(r) for r in data]


def _columns(rows: Iterable[dict[str, Any]]) -> set[str]:
    return set().union(*(r.keys() for r in rows))


def _content(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _last_turn(messages: Any, role: str) -> str:
    if isinstance(messages, str):
        return messages
    for message in reversed(messages or []):
        if isinstance(message, dict) and message.get("role") == role:
            return _content(message.get("content"))
    return ""


def original_pair(row: dict[str, Any]) -> tuple[str, str]:
    """``(instruction, response)`` of a row before recycling, for every data format an export can hold.

    Alpaca columns come first: an Alpaca export also has ``prompt``/``completion``, but those are the *recycled*
    conversation. Exports rename other formats' columns ``original_<name>``; a raw ``recycle_dataset`` result does not.
    """
    if "instruction" in row or "output" in row:
        instruction, extra = _content(row.get("instruction")), _content(row.get("input"))
        return request_text(instruction, extra), _content(row.get("output"))
    messages = row.get("original_messages", row.get("messages"))
    if messages is None and row.get("original_conversations", row.get("conversations")) is not None:  # ShareGPT
        messages = [sharegpt_as_chat(m) for m in row.get("original_conversations", row.get("conversations"))
                    if isinstance(m, dict)]
    if messages is not None:
        return _last_turn(messages, "user"), _last_turn(messages, "assistant")
    prompt = row.get("original_prompt", row.get("prompt") if "original_prompt" not in row else None)
    completion = row.get("original_completion", row.get("completion") if "original_completion" not in row else None)
    return _last_turn(prompt, "user"), _last_turn(completion, "assistant")


def recycled_pair(row: dict[str, Any]) -> tuple[str, str] | None:
    """``(instruction, response)`` that is trained on, or None for a skipped row (no recycled fields)."""
    if row.get("recycled_instruction") is None and row.get("recycled_output") is None:
        return None
    extra = _content(row.get("recycled_input"))
    return request_text(_content(row.get("recycled_instruction")), extra), _content(row.get("recycled_output"))


def _bad_input(row: dict[str, Any]) -> bool:
    """Skipped as bad input: a skip reason and no recycled fields. A row the selection rule dropped also has a skip
    reason, but it was recycled and scored (its recycled fields are the original's); a row passed through (no
    exchange to recycle) was not bad input."""
    return row.get("skip_reason") not in (None, PASSED_THROUGH) and row.get("recycled_output") is None


def _dropped(row: dict[str, Any]) -> bool:
    return "selected_version" in row and row["selected_version"] is None and not _bad_input(row)


def _phase_ran(row: dict[str, Any], raw_column: str, fallback_column: str, has_raw: bool) -> bool:
    # The raw text is set exactly when the phase ran; without a raw column (someone dropped it) a present fallback
    # column means the phase ran on every row that was not skipped.
    if row.get(fallback_column) is not None or row.get(raw_column) is not None:
        return True
    return not has_raw and not _bad_input(row)


_words = word_count  # the package's one word count (reflect_trainer.text)


def _finite(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


# ---------------------------------------------------------------------------------------------------------------------
# The numbers
# ---------------------------------------------------------------------------------------------------------------------


def _mean_median(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None}
    return {"mean": statistics.fmean(values), "median": float(statistics.median(values))}


def summarize(data: Any) -> dict[str, Any]:
    """The report's numbers, apart from the HTML (a ``datasets.Dataset`` or a list of row dicts).

    Returns ``rows``, ``skipped``; ``phases`` (per phase that ran on at least one row: ``accepted``, ``fallback`` and
    ``reasons`` — fallback reason -> count); ``selection`` (version -> count, ``dropped`` for None; None when there is
    no ``selected_version`` column); ``lengths`` (mean/median words of instruction and response before and after, and
    of the response length ratio after/before, over rows trained on: not skipped, not dropped by selection);
    ``scores`` (``ifd``/``rifd`` -> version -> number of finite scores and their mean/median, for score columns
    present).
    """
    rows = _as_rows(data)
    columns = _columns(rows)
    summary: dict[str, Any] = {
        "rows": len(rows),
        "skipped": sum(map(_bad_input, rows)),
        "phases": {},
        "selection": None,
        "lengths": {},
        "scores": {},
    }
    for key, _label, raw_column, fallback_column in PHASES:
        if fallback_column not in columns:
            continue
        ran = [r for r in rows if _phase_ran(r, raw_column, fallback_column, raw_column in columns)]
        if not ran:  # e.g. response reflection in instruction mode: the column exists, all None
            continue
        reasons = Counter(str(r[fallback_column]) for r in ran if r.get(fallback_column) is not None)
        summary["phases"][key] = {
            "accepted": len(ran) - sum(reasons.values()),
            "fallback": sum(reasons.values()),
            "reasons": dict(reasons.most_common()),
        }
    if "selected_version" in columns:
        chosen = Counter(str(r["selected_version"]) if r.get("selected_version") is not None else DROPPED
                         for r in rows if not _bad_input(r))
        summary["selection"] = {v: chosen.get(v, 0) for v in (*VERSIONS, DROPPED)} | dict(chosen)
    summary["lengths"] = _length_summary(rows)
    for prefix, _label in SCORES:
        for version in VERSIONS:
            values = _score_values(rows, f"{prefix}_{version}")
            if values is not None:
                summary["scores"].setdefault(prefix, {})[version] = {"n": len(values), **_mean_median(values)}
    return summary


def _length_pairs(rows: list[dict[str, Any]]) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    # Rows the selection rule dropped are not trained on: their unchanged lengths would dilute the change.
    return [(original_pair(r), after) for r in rows if not _dropped(r) and (after := recycled_pair(r)) is not None]


def _length_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    pairs = _length_pairs(rows)
    out: dict[str, Any] = {"n": len(pairs)}
    for i, part in enumerate(("instruction", "response")):
        out[part] = {"before": _mean_median([_words(b[i]) for b, _ in pairs]),
                     "after": _mean_median([_words(a[i]) for _, a in pairs])}
    out["response_ratio"] = _mean_median(response_length_ratios(rows))
    return out


def response_length_ratios(data: Any) -> list[float]:
    """Words of the recycled response over words of the original one, per row trained on (original >= 1 word)."""
    rows = data if isinstance(data, list) else _as_rows(data)
    return [_words(a[1]) / _words(b[1]) for b, a in _length_pairs(rows) if _words(b[1])]


def _score_values(rows: list[dict[str, Any]], column: str) -> list[float] | None:
    """Finite values of a score column, or None when no row has the column."""
    if not any(column in r for r in rows):
        return None
    return [v for r in rows if (v := _finite(r.get(column))) is not None]


def summary_counts(summary: dict[str, Any]) -> dict[str, int]:
    """The integer counts of a :func:`summarize` result under the flat keys the page uses (``rows``, ``skipped``,
    ``<phase>/accepted``, ``<phase>/fallback``, ``<phase>/reason/<reason>``, ``selection/<version>``)."""
    counts = {"rows": summary["rows"], "skipped": summary["skipped"]}
    for phase, outcome in summary["phases"].items():
        counts[f"{phase}/accepted"] = outcome["accepted"]
        counts[f"{phase}/fallback"] = outcome["fallback"]
        for reason, n in outcome["reasons"].items():
            counts[f"{phase}/reason/{reason}"] = n
    for version, n in (summary["selection"] or {}).items():
        counts[f"selection/{version}"] = n
    return counts


# ---------------------------------------------------------------------------------------------------------------------
# HTML pieces
# ---------------------------------------------------------------------------------------------------------------------


def _count_id(key: str) -> str:
    # Reasons are data, so an id built from one is reduced to safe characters; data-count keeps the exact key.
    return "count-" + re.sub(r"[^A-Za-z0-9_-]", "-", key.replace("/", "-"))


def _count(key: str, n: int, tag: str = "td") -> str:
    return f'<{tag} class="num" id="{_e(_count_id(key))}" data-count="{_e(key)}">{n}</{tag}>'


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def svg_histogram(values: list[float], title: str, bins: int = 20, reference: float | None = 1.0,
                  width: int = 520, height: int = 200) -> str:
    """An inline SVG histogram (no script, no external font); a dashed line marks ``reference`` when in range."""
    left, right, top, bottom = 40, 10, 24, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" class="hist" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">'
            f'<text x="{left}" y="15" class="title">{_e(title)} (n={len(values)})</text>')
    if not values:
        return head + f'<text x="{left}" y="{top + plot_h // 2}">no values</text></svg>'
    lo, hi = min(values), max(values)
    if hi == lo:  # one distinct value: a single bar in the middle, on an axis that keeps its sign
        lo, hi = (lo * 0.5, lo * 1.5) if lo > 0 else (lo * 1.5, lo * 0.5) if lo < 0 else (-0.5, 0.5)
    step = (hi - lo) / bins
    counts = [0] * bins
    for v in values:
        counts[min(int((v - lo) / step), bins - 1)] += 1
    peak = max(counts)
    parts = [head, f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" class="axis"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" class="axis"/>',
             f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{peak}</text>',
             f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end">0</text>']
    bar_w = plot_w / bins
    for i, n in enumerate(counts):
        if not n:
            continue
        h = plot_h * n / peak
        x, y = left + i * bar_w, top + plot_h - h
        parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(bar_w - 1, 1):.1f}" height="{h:.1f}" class="bar">'
                     f'<title>{lo + i * step:.3g} – {lo + (i + 1) * step:.3g}: {n}</title></rect>')
    for frac, anchor in ((0.0, "start"), (0.5, "middle"), (1.0, "end")):
        parts.append(f'<text x="{left + frac * plot_w:.1f}" y="{top + plot_h + 16}" text-anchor="{anchor}">'
                     f'{lo + frac * (hi - lo):.3g}</text>')
    if reference is not None and lo <= reference <= hi:
        x = left + plot_w * (reference - lo) / (hi - lo)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" class="ref"/>')
    return "".join(parts) + "</svg>"


def _tokens(text: str) -> list[tuple[str, str]]:
    """``(word, whitespace after it)`` pairs; leading whitespace goes with an empty first word."""
    out = [(m.group(1), m.group(2)) for m in re.finditer(r"(\S+)(\s*)", text)]
    lead = text[: len(text) - len(text.lstrip())]
    return ([("", lead)] if lead else []) + out


def word_diff(before: str, after: str) -> tuple[str, str]:
    """Escaped HTML of ``before`` with removed words in ``<del>`` and of ``after`` with added words in ``<ins>``."""
    a, b = _tokens(before), _tokens(after)
    # Words are compared without their whitespace, so a reflowed line is not a change; autojunk off because it would
    # treat common words of a long answer as junk and report them as changed.
    matcher = difflib.SequenceMatcher(None, [w for w, _ in a], [w for w, _ in b], autojunk=False)
    left, right = [], []
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        old = "".join(w + s for w, s in a[i1:i2])
        new = "".join(w + s for w, s in b[j1:j2])
        if op == "equal":
            left.append(_e(old))
            right.append(_e(new))
            continue
        if old:
            left.append(f"<del>{_e(old)}</del>")
        if new:
            right.append(f"<ins>{_e(new)}</ins>")
    return "".join(left), "".join(right)


def _badge(label: str, value: str | None, ok: bool) -> str:
    return f'<span class="badge {"ok" if ok else "fb"}">{_e(label)}: {_e(value or "accepted")}</span>'


def _row_html(index: int, row: dict[str, Any], columns: set[str]) -> str:
    before_q, before_a = original_pair(row)
    badges = []
    if _bad_input(row):
        badges.append(f'<span class="badge fb">skipped: {_e(str(row["skip_reason"]))}</span>')
    for key, _label, raw_column, fallback_column in PHASES:
        if fallback_column in columns and _phase_ran(row, raw_column, fallback_column, raw_column in columns):
            reason = row.get(fallback_column)
            finish = row.get(PHASE_DETAILS[key][0])
            badges.append(_badge(key, None if reason is None else str(reason), reason is None)
                          + (f'<span class="badge">stopped: {_e(str(finish))}</span>' if finish else ""))
    if "selected_version" in columns and not _bad_input(row):
        selected = row.get("selected_version")
        badges.append(f'<span class="badge sel" data-selected="{_e(str(selected or DROPPED))}">selected: '
                      f'{_e(str(selected or DROPPED))}</span>')
    after = recycled_pair(row)
    if after is None:
        left_q, right_q, left_a, right_a = _e(before_q), "", _e(before_a), ""
    else:
        left_q, right_q = word_diff(before_q, after[0])
        left_a, right_a = word_diff(before_a, after[1])
    raws = "".join(f"<h4>{_e(key)}</h4><pre>{_e(_content(row.get(raw_column)))}</pre>"
                   for key, _label, raw_column, _fb in PHASES if row.get(raw_column) is not None)
    raw_block = f"<details><summary>oracle output</summary>{raws}</details>" if raws else ""
    versions_block = _versions_html(row, before_q, before_a)
    return (f'<section class="pair" id="row-{index}" data-row="{index}"><h3>row {index}</h3>'
            f'<div class="badges">{"".join(badges)}</div>'
            '<table class="sbs"><tr><th></th><th>original</th><th>recycled</th></tr>'
            f'<tr><th>instruction</th><td class="text">{left_q}</td><td class="text">{right_q}</td></tr>'
            f'<tr><th>response</th><td class="text">{left_a}</td><td class="text">{right_a}</td></tr></table>'
            f"{versions_block}{raw_block}</section>")


def _versions_html(row: dict[str, Any], before_q: str, before_a: str) -> str:
    """Selective mode: every version of the pair with its scores, collapsed (the side-by-side shows the chosen one)."""
    if row.get("a_output") is None and row.get("qa_output") is None:
        return ""
    q = _content(row.get("reflected_instruction"))
    texts = {"original": (before_q, before_a), "q": (q, _content(row.get("reflected_output"))),
             "a": (before_q, _content(row.get("a_output"))), "qa": (q, _content(row.get("qa_output")))}
    cells = []
    for version in VERSIONS:
        scores = ", ".join(f"{prefix} {_fmt(_finite(row.get(f'{prefix}_{version}')), 3)}" for prefix, _ in SCORES)
        cells.append(f'<tr data-version="{version}"><th>{version}</th><td class="num">{_e(scores)}</td>'
                     f'<td class="text">{_e(texts[version][0])}</td><td class="text">{_e(texts[version][1])}</td></tr>')
    return ('<details><summary>all versions (selective mode)</summary><table class="sbs"><tr><th>version</th>'
            f'<th>scores</th><th>instruction</th><th>response</th></tr>{"".join(cells)}</table></details>')


_CSS = """
body{font-family:sans-serif;margin:24px;color:#222;max-width:1240px}
table{border-collapse:collapse;margin:8px 0 16px}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.hist text{font-size:11px;fill:#333}.hist .title{font-weight:bold}
.hist .bar{fill:#4a7bd0}.hist .axis{stroke:#555}.hist .ref{stroke:#c33;stroke-dasharray:4 3}
.plots{display:flex;flex-wrap:wrap;gap:12px}
.pair{border-top:2px solid #ddd;margin-top:16px}
.sbs{width:100%;table-layout:fixed}.sbs th:first-child{width:90px}
.text{white-space:pre-wrap;word-wrap:break-word;font-size:13px}
del{background:#fdd;color:#900}ins{background:#dfd;color:#060;text-decoration:none}
.badge{display:inline-block;border-radius:4px;padding:1px 6px;margin:2px;font-size:12px}
.ok{background:#e3f3e3}.fb{background:#fbe4c8}.sel{background:#dde6fa}
pre{white-space:pre-wrap;font-size:12px;background:#f6f6f6;padding:6px}
.note{color:#555}
"""


def _replaced_answer(row: dict[str, Any], phase: str) -> str:
    """The answer a phase's rewrite replaces: response reflection in ``both`` mode rewrites the instruction-reflected
    answer when instruction reflection was accepted, else the original one."""
    replaced_column = PHASE_DETAILS[phase][2]
    if replaced_column is not None:
        return _content(row.get(replaced_column))
    if row.get("instruction_reflection_fallback") is None and row.get("reflected_output") is not None:
        return _content(row.get("reflected_output"))
    return original_pair(row)[1]


def _tail(text: str, chars: int = 160) -> str:
    return text if len(text) <= chars else "…" + text[-chars:]


def _acceptance_html(rows: list[dict[str, Any]], columns: set[str]) -> list[str]:
    """What was accepted (how each rewrite ended, how long it is against what it replaces) and what was rejected and
    why, with examples: the evidence that "accepted" means complete, not degenerate and not shorter (form only)."""
    from .gates import ends_mid_sentence

    out = ['<h2>Accepted rewrites</h2><table id="accepted"><tr><th>phase</th><th>accepted</th>'
           "<th>how the oracle stopped</th><th>ending mid-sentence</th><th>median length ratio (words, new / "
           "replaced)</th></tr>"]
    rejected = ['<h2>What was rejected and why</h2><table id="rejected"><tr><th>phase</th><th>reason</th><th>rows</th>'
                "<th>examples (how the oracle's text ended)</th></tr>"]
    for key, label, raw_column, fallback_column in PHASES:
        finish_column, new_column, _ = PHASE_DETAILS[key]
        if fallback_column not in columns:
            continue
        ran = [r for r in rows if _phase_ran(r, raw_column, fallback_column, raw_column in columns)]
        if not ran:
            continue
        accepted = [r for r in ran if r.get(fallback_column) is None and r.get(new_column) is not None]
        finishes = Counter(str(r.get(finish_column) or "unknown") for r in accepted)
        mid = sum(ends_mid_sentence(_content(r.get(new_column))) for r in accepted)
        ratios = [_words(_content(r.get(new_column))) / max(1, _words(_replaced_answer(r, key))) for r in accepted]
        median = statistics.median(ratios) if ratios else None
        out.append(f'<tr data-phase="{key}"><th>{_e(label)}</th><td class="num">{len(accepted)}</td>'
                   f'<td class="finishes">{_e(", ".join(f"{k}: {v}" for k, v in sorted(finishes.items())) or "-")}'
                   f'</td><td class="num" data-mid-sentence="{key}">{mid}</td>'
                   f'<td class="num" data-length-ratio="{key}">{_fmt(median, 2)}</td></tr>')
        by_reason: dict[str, list[dict[str, Any]]] = {}
        for r in ran:
            if r.get(fallback_column) is not None:
                by_reason.setdefault(str(r[fallback_column]), []).append(r)
        for reason, group in sorted(by_reason.items(), key=lambda item: -len(item[1])):
            examples = "".join(f"<pre>{_e(_tail(_content(r.get(raw_column))))}</pre>"
                               for r in group[:EXAMPLES_PER_REASON])
            rejected.append(f'<tr data-rejected="{_e(key)}/{_e(reason)}"><td>{_e(key)}</td><td>{_e(reason)}</td>'
                            f'<td class="num">{len(group)}</td><td>{examples}</td></tr>')
    if len(rejected) == 1:
        rejected.append('<tr><td colspan="4">nothing rejected</td></tr>')
    return out + ["</table>"] + rejected + ["</table>"]


def render_report(data: Any, max_rows: int = 200, title: str = "recycled data") -> str:
    """The report page as a string (see :func:`write_report`)."""
    if max_rows < 0:
        raise ValueError(f"max_rows must be >= 0, got {max_rows}")
    rows = _as_rows(data)
    columns = _columns(rows)
    summary = summarize(rows)
    shown = rows[:max_rows]
    left_out = len(rows) - len(shown)

    out = ["<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
           # No script may run and nothing may load, even if some data text slipped through unescaped.
           "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">",
           f"<title>Reflection-Tuning report: {_e(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>Reflection-Tuning report</h1><p class=\"note\">{_e(title)}</p>",
           "<h2>Summary</h2><table id=\"summary\">",
           f"<tr><th>rows</th>{_count('rows', summary['rows'])}</tr>",
           f"<tr><th>skipped rows (bad input)</th>{_count('skipped', summary['skipped'])}</tr></table>",
           # Without this the 0 above misleads: `recycle --out` writes its counters next to the export instead.
           '<p class="note">An export written by <code>reflect-trainer recycle</code> leaves out rows skipped as bad '
           "input (and rows the selection rule dropped); its <code>.stats.json</code> counts them.</p>"]

    out.extend(_acceptance_html(rows, columns))
    out.append("<h2>Reflection phases</h2>")
    if summary["phases"]:
        out.append('<table id="phases"><tr><th>phase</th><th>accepted</th><th>fell back</th></tr>')
        for key, label, _raw, _fb in PHASES:
            if key in summary["phases"]:
                outcome = summary["phases"][key]
                out.append(f'<tr data-phase="{key}"><th>{_e(label)}</th>'
                           f'{_count(f"{key}/accepted", outcome["accepted"])}'
                           f'{_count(f"{key}/fallback", outcome["fallback"])}</tr>')
        out.append('</table><h3>Fallback reasons</h3><table id="reasons"><tr><th>phase</th><th>reason</th>'
                   "<th>rows</th></tr>")
        any_reason = False
        for key, outcome in summary["phases"].items():
            for reason, n in outcome["reasons"].items():
                any_reason = True
                out.append(f'<tr><td>{_e(key)}</td><td>{_e(reason)}</td>{_count(f"{key}/reason/{reason}", n)}</tr>')
        if not any_reason:
            out.append('<tr><td colspan="3">no fallbacks</td></tr>')
        out.append("</table>")
    else:
        out.append('<p class="note">No reflection phase columns in this data.</p>')

    if summary["selection"] is not None:
        out.append('<h2>Selection (selective mode)</h2><table id="selection"><tr><th>version</th><th>rows</th></tr>')
        for version, n in summary["selection"].items():
            out.append(f"<tr><td>{_e(version)}</td>{_count(f'selection/{version}', n)}</tr>")
        out.append("</table>")

    lengths = summary["lengths"]
    out.append(f'<h2>Lengths (words, over {lengths["n"]} rows trained on)</h2><table id="lengths">'
               "<tr><th></th><th>mean before</th><th>mean after</th><th>median before</th><th>median after</th></tr>")
    for part in ("instruction", "response"):
        b, a = lengths[part]["before"], lengths[part]["after"]
        out.append(f'<tr data-length="{part}"><th>{part}</th><td class="num">{_fmt(b["mean"])}</td>'
                   f'<td class="num">{_fmt(a["mean"])}</td><td class="num">{_fmt(b["median"])}</td>'
                   f'<td class="num">{_fmt(a["median"])}</td></tr>')
    ratio = lengths["response_ratio"]
    out.append(f'</table><p>Response length ratio after/before: mean {_fmt(ratio["mean"], 2)}, '
               f'median {_fmt(ratio["median"], 2)}.</p><div class="plots">'
               f'{svg_histogram(response_length_ratios(rows), "response length ratio (after / before)")}</div>')

    out.append("<h2>IFD and reverse-IFD</h2>")
    if summary["scores"]:
        out.append('<p class="note">The dashed line marks 1.0 (the selection threshold by default).</p>'
                   '<div class="plots" id="score-plots">')
        for prefix, label in SCORES:
            for version in summary["scores"].get(prefix, {}):
                out.append(f'<div data-score="{prefix}_{version}">'
                           f'{svg_histogram(_score_values(rows, f"{prefix}_{version}") or [], f"{label}: {version}")}'
                           "</div>")
        out.append("</div>")
    else:
        out.append('<p class="note" id="no-scores">No IFD / reverse-IFD scores in this data '
                   "(they come with selective mode).</p>")

    out.append(f'<h2>Pairs</h2><p id="rows-shown">Showing {_count("shown", len(shown), "span")} of {len(rows)} rows; '
               f'{_count("left_out", left_out, "span")} left out'
               f'{" (raise --max-rows to see them)" if left_out else ""}.</p>')
    out.extend(_row_html(i, row, columns) for i, row in enumerate(shown))
    out.append("</body></html>")
    return "\n".join(out)


def write_report(data: Any, path: str | Path, max_rows: int = 200, title: str | None = None) -> Path:
    """Write the report for ``data`` (a ``datasets.Dataset`` or a list of row dicts) to ``path``; return the path.

    Shows summary counts, fallback reasons, selection choices, length changes, IFD/reverse-IFD histograms, and the
    first ``max_rows`` pairs before and after with word-level differences (saying how many were left out).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(data, max_rows=max_rows, title=title or path.name), encoding="utf-8")
    return path
