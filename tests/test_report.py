"""The HTML report on real recycled AlpacaEval pairs (real 4-bit SmolLM2 oracle, real IFD scores), rendered in
headless Chromium: counts in the rendered page equal the summary, a real screenshot, escaping, the row cap, no scores,
skipped rows, the CLI."""

import html
import io
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from datasets import Dataset

from reflect_trainer import load_data, save_recycled, to_sft_dataset
from reflect_trainer.cli import main as cli_main
from reflect_trainer.report import VERSIONS, render_report, summarize, summary_counts, write_report
from reflect_trainer.selection import StudentScorer
from test_support.recycling import recycle as recycle_with

SLOW = pytest.mark.slow  # tests that read the data recycled by the real oracle
N_PAIRS, MAX_NEW_TOKENS = 6, 24
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
COUNT_RE = re.compile(r'data-count="([^"]+)"[^>]*>(\d+)<')


def chromium(page: Path, *args: str) -> str:
    """Run headless Chromium on ``page`` with a fresh profile; return stdout. Fails (never skips) without it."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("headless Chromium is required for the report tests and was not found on PATH; "
                    "install Debian's package: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"chromium failed ({result.returncode}): {result.stderr[-2000:]}"
    return result.stdout


def dom_counts(dom: str) -> dict[str, int]:
    # Chromium may or may not re-escape < and > inside attribute values when it serializes the DOM.
    return {html.unescape(key): int(n) for key, n in COUNT_RE.findall(dom)}


def recycle(data, cache_dir, oracle, mode, scorer=None):
    out, recycler = recycle_with(data, oracle, cache_dir, scorer, max_new_tokens=MAX_NEW_TOKENS, template_set="compact",
                                 mode=mode, on_bad_row="skip", selection_drop=True)
    return recycler, out


@pytest.fixture(scope="module")
def recycled(tmp_path_factory, real_oracle, alpaca_pairs, oracle_path):
    """Six real pairs (the shortest answers of the first 100, to keep scoring cheap) recycled in `selective` mode
    (every version, scored by the fp32 student; rows failing the rule dropped, as in the released code), then in
    `both` mode from the same cache (no score or selection columns)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    first = alpaca_pairs.select(range(100))
    shortest = sorted(range(len(first)), key=lambda i: len(first[i]["output"]))[:N_PAIRS]
    data = first.select(shortest)
    cache_dir = tmp_path_factory.mktemp("report-cache")
    tokenizer = AutoTokenizer.from_pretrained(oracle_path)
    student = AutoModelForCausalLM.from_pretrained(oracle_path, dtype=torch.float32).eval()
    _, selective = recycle(data, cache_dir, real_oracle, "selective", StudentScorer(student, tokenizer, max_length=256))
    recycler, both = recycle(data, cache_dir, real_oracle, "both")
    return {"data": data, "recycler": recycler, "both": to_sft_dataset(both), "selective": selective}


@SLOW
def test_report_renders_in_chromium_with_counts_equal_to_the_summary_and_a_real_screenshot(recycled, tmp_path):
    from PIL import Image, ImageChops

    data = recycled["selective"]
    page = write_report(data, tmp_path / "report.html")
    summary = summarize(data)

    # The summary is what the columns say, counted independently here.
    assert summary["rows"] == N_PAIRS and summary["skipped"] == 0
    phases = (("instruction_reflection", "instruction_reflection_fallback"),
              ("response_reflection", "response_reflection_fallback"),
              ("response_reflection_of_original", "a_fallback"))
    for phase, column in phases:
        reasons = Counter(r for r in data[column] if r is not None)
        assert summary["phases"][phase]["reasons"] == dict(reasons)
        assert summary["phases"][phase]["accepted"] == N_PAIRS - sum(reasons.values())
    chosen = Counter(v or "dropped" for v in data["selected_version"])
    assert {k: n for k, n in summary["selection"].items() if n} == dict(chosen)
    assert set(summary["scores"]["ifd"]) == set(summary["scores"]["rifd"]) == set(VERSIONS)
    # Lengths count the rows kept for training only: on a copy where one row is dropped and the others are kept
    # (whatever the rule chose on this data), both kinds are present.
    mixed = [{**r, "selected_version": None if i == 0 else r["selected_version"] or "original"}
             for i, r in enumerate(data.to_list())]
    kept = [r["output"] for r in mixed[1:]]
    lengths = summarize(mixed)["lengths"]
    assert lengths["n"] == len(kept) == N_PAIRS - 1
    assert lengths["response"]["before"]["mean"] == pytest.approx(sum(len(o.split()) for o in kept) / len(kept))
    assert summary["lengths"]["n"] == sum(v is not None for v in data["selected_version"])

    dom = chromium(page, "--dump-dom")
    assert dom_counts(dom) == {**summary_counts(summary), "shown": N_PAIRS, "left_out": 0}
    assert 'id="count-rows"' in dom and 'id="count-instruction_reflection-accepted"' in dom
    for prefix in ("ifd", "rifd"):  # one histogram per version scored
        for v in VERSIONS:
            assert re.search(rf'data-score="{prefix}_{v}"><svg[^>]*>.*?<rect', dom, re.S), f"{prefix}_{v} plot"
    assert dom.count('class="pair"') == N_PAIRS
    # Word diffs appear exactly when some row's trained text differs from its original (none when all fell back).
    changed = any((r["recycled_instruction"], r["recycled_output"]) != (r["instruction"], r["output"]) for r in data)
    assert ("<del>" in dom or "<ins>" in dom) == changed

    # The screenshot against one of an empty page taken the same way: the header band and most 200-pixel bands of the
    # window must differ from the empty page's (a blank render, or one that stopped after the header, would not).
    empty = tmp_path / "empty.html"
    empty.write_text("<!doctype html><html><head><meta charset=utf-8></head><body></body></html>")
    images = {}
    for name, source in (("report", page), ("empty", empty)):
        shot = tmp_path / f"{name}.png"
        chromium(source, f"--screenshot={shot}", "--window-size=1280,2000")
        images[name] = Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")
    bands = [(0, top, 1280, top + 200) for top in range(0, 2000, 200)]
    differing = [ImageChops.difference(images["report"].crop(b), images["empty"].crop(b)).getbbox() is not None
                 for b in bands]
    assert differing[0] and sum(differing) >= len(bands) // 2, f"bands unlike an empty page: {differing}"


@SLOW
def test_untrusted_text_is_escaped_and_no_injected_script_runs(recycled, tmp_path):
    rows = recycled["selective"].to_list()
    payload = '<script>document.title="PWNED"</script>'
    rows[0]["instruction"] = payload + " " + rows[0]["instruction"]
    rows[0]["recycled_output"] = '<img src=x onerror="document.title=\'PWNED\'"> ' + rows[0]["recycled_output"]
    rows[1]["instruction_reflection_fallback"] = "<b>odd reason</b>"
    page = write_report(rows, tmp_path / "hostile.html")
    source = page.read_text()
    assert "<script" not in source.lower() and "<img" not in source.lower() and "<b>odd" not in source
    assert "&lt;script&gt;document.title=&quot;PWNED&quot;&lt;/script&gt;" in source

    dom = chromium(page, "--dump-dom")
    assert "<script" not in dom.lower() and "<img" not in dom.lower(), "no injected element in the rendered DOM"
    assert "PWNED" not in re.search(r"<title>(.*?)</title>", dom, re.S).group(1), "no injected script ran"
    assert "&lt;script&gt;" in dom  # shown as text
    assert dom_counts(dom)["instruction_reflection/reason/<b>odd reason</b>"] == 1


@SLOW
def test_row_cap_shows_the_first_rows_and_says_how_many_were_left_out(recycled):
    page = render_report(recycled["selective"], max_rows=2)
    assert re.findall(r'data-row="(\d+)"', page) == ["0", "1"]
    counts = dom_counts(page)
    assert counts["shown"] == 2 and counts["left_out"] == N_PAIRS - 2
    assert re.search(rf'Showing <span[^>]*data-count="shown">2</span> of {N_PAIRS} rows', page)
    assert "--max-rows" in page
    assert counts["rows"] == N_PAIRS  # counts are over every row, not the shown ones


@SLOW
def test_report_without_score_or_selection_columns_says_so(recycled):
    summary = summarize(recycled["both"])
    assert summary["scores"] == {} and summary["selection"] is None
    assert "response_reflection_of_original" not in summary["phases"]
    page = render_report(recycled["both"])
    assert 'id="no-scores"' in page and "data-score=" not in page and 'id="selection"' not in page
    assert dom_counts(page) == {**summary_counts(summary), "shown": N_PAIRS, "left_out": 0}


@SLOW
def test_skipped_rows_are_counted_and_shown_without_recycled_fields(recycled):
    """The transform keeps a bad row with its skip reason (an export drops it); served from the cache."""
    bad = {"instruction": ["Say hi."], "input": [""], "output": [None], "source": ["test"]}
    batch = {k: recycled["data"][k][:2] + bad[k] for k in bad}
    rows = Dataset.from_dict(recycled["recycler"](batch, indices=[0, 1, 2]))
    summary = summarize(rows)
    assert summary["rows"] == 3 and summary["skipped"] == 1
    assert summary["lengths"]["n"] == 2
    assert all(o["accepted"] + o["fallback"] == 2 for o in summary["phases"].values())
    page = render_report(rows)
    assert dom_counts(page)["skipped"] == 1 and "skipped: row 2" in page


@SLOW
def test_cli_report_writes_the_page_next_to_the_export(recycled, tmp_path, capsys):
    out = save_recycled(to_sft_dataset(recycled["selective"], keep_dropped=True), tmp_path / "recycled.jsonl")
    assert cli_main(["report", str(out), "--max-rows", "3"]) == 0
    page = Path(str(out) + ".report.html")
    assert str(page) in capsys.readouterr().out
    counts = dom_counts(page.read_text())
    assert counts == {**summary_counts(summarize(load_data(out))), "shown": 3, "left_out": N_PAIRS - 3}

    custom = tmp_path / "pages" / "r.html"
    assert cli_main(["report", str(out), "--html", str(custom)]) == 0
    assert dom_counts(custom.read_text())["left_out"] == 0


def test_report_shows_rejections_by_reason_with_examples_and_how_accepted_rewrites_ended():
    # The report is a function of the export's columns: these rows stand for an export (no oracle needed).
    rows = [
        {"instruction": "Q1", "output": "one two three four", "recycled_instruction": "Q1",
         "recycled_output": "one two three four five six seven eight.", "response_reflection_raw": "[Better Answer] x",
         "response_reflection_fallback": None, "response_reflection_finish": "stop", "skip_reason": None},
        {"instruction": "Q2", "output": "a b c d", "recycled_instruction": "Q2", "recycled_output": "a b c d",
         "response_reflection_raw": "[Better Answer] it was cut off in the middle of a", "skip_reason": None,
         "response_reflection_fallback": "truncated", "response_reflection_finish": "length"},
        {"instruction": "Q3", "output": "a b c d", "recycled_instruction": "Q3", "recycled_output": "a b c d",
         "response_reflection_raw": "[Better Answer] cut again", "response_reflection_fallback": "truncated",
         "response_reflection_finish": "length", "skip_reason": None},
    ]
    page = render_report(rows)
    rejected = re.search(r'<tr data-rejected="response_reflection/truncated">(.*?)</tr>', page, re.S).group(1)
    assert re.search(r'<td class="num">2</td>', rejected)
    assert "in the middle of a</pre>" in rejected and "cut again</pre>" in rejected  # examples show the ending
    accepted = re.search(r'<tr data-phase="response_reflection"><th>[^<]*</th>(.*?)</tr>', page, re.S).group(1)
    assert '<td class="num">1</td>' in accepted and "stop: 1" in accepted
    assert re.search(r'data-mid-sentence="response_reflection">0<', accepted)
    assert re.search(r'data-length-ratio="response_reflection">2\.00<', accepted)  # 8 words replace 4
    assert "stopped: length" in page  # each row's badge says how the oracle stopped
