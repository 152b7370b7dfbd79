"""report.html: every held-out example, escaped, self-contained; its filter driven in a real headless browser."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from result_folders import NASTY, RL_OUTCOMES, SFT_OUTCOMES, write_run

from posttrain.pipeline.results import ResultsDir

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install -y chromium)"
)
KINDS = {"sft": ("nll", SFT_OUTCOMES), "rl": ("score", RL_OUTCOMES)}


class Examples(HTMLParser):
    """The page's example articles in document order: (index, outcome, hidden)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[int, str, bool]] = []
        self.body: dict[str, str | None] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "body":
            self.body = a
        if tag == "article" and "data-index" in a:
            self.found.append((int(a["data-index"] or -1), a.get("data-outcome") or "", "hidden" in a))


def parse(page: str) -> Examples:
    p = Examples()
    p.feed(page)
    return p


@pytest.fixture(params=sorted(KINDS))
def run(request, tmp_path: Path) -> tuple[Path, dict[int, str]]:
    kind, outcomes = KINDS[request.param]
    folder = tmp_path / "results"
    write_run(folder, f"{request.param}_run", kind=kind)
    return folder, outcomes


def test_every_example_is_shown_classified_and_escaped(run):
    folder, outcomes = run
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert sorted((i, o) for i, o, _ in parse(page).found) == sorted(outcomes.items())
    assert not any(hidden for *_, hidden in parse(page).found)  # the script hides, the page alone shows all
    assert page.count("<script>") == 1  # only the page's own; the rows' <script> is text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<b>bold</b>" not in page
    summary = ResultsDir(folder).read_summary()
    assert summary["headline"].replace("→", "") in page.replace("→", "") and summary["verdict"] in page
    if summary["task_type"] == "sft":
        assert "NLL 3" in page and "evaluation timed out &lt;after 30 s&gt;" in page
    else:
        assert "transcript (2 turns)" in page and "too &lt;high&gt;" in page


def test_page_is_self_contained(run):
    folder, _ = run
    page = (folder / "report.html").read_text(encoding="utf-8")
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", page, flags=re.I)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs), refs
    assert not re.search(r"url\(|@import|<link|https?://[^\s\"'<]*\.(?:js|css)", page, flags=re.I)


def test_report_html_is_moved_aside_with_the_run(tmp_path: Path):
    folder = tmp_path / "results"
    write_run(folder, "first")
    ResultsDir(folder).prepare("second")
    assert (folder / "previous" / "first" / "report.html").is_file()
    assert not (folder / "report.html").exists()


# ------------------------------------------------------------------------------------------- in a browser


def chromium(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        CHROMIUM or "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=2000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        *args,
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]


@needs_chromium
def test_the_console_check_catches_a_script_error(tmp_path: Path):
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><script>undefinedFunction();</script></body></html>")
    done = chromium(tmp_path, page.as_uri(), "--dump-dom")
    assert any("Uncaught" in line for line in console_errors(done.stderr)), done.stderr[-2000:]


@needs_chromium
def test_filter_from_the_url_hash_in_a_browser(run, tmp_path: Path):
    folder, outcomes = run
    url = (folder / "report.html").as_uri()
    done = chromium(tmp_path, url + "#filter=regressed", "--dump-dom")
    assert console_errors(done.stderr) == []
    dom = parse(done.stdout)
    assert dom.body.get("data-filter") == "regressed"
    shown = sorted(i for i, _, hidden in dom.found if not hidden)
    assert shown == sorted(i for i, o in outcomes.items() if o == "regressed") and shown
    assert sorted(i for i, _, hidden in dom.found if hidden) == sorted(
        i for i, o in outcomes.items() if o != "regressed"
    )

    # Sorted by change, most regressed first: the regressed examples lead, the improved ones close.
    done = chromium(tmp_path, url + "#filter=all&sort=worst", "--dump-dom")
    assert console_errors(done.stderr) == []
    order = [outcomes[i] for i, _, hidden in parse(done.stdout).found if not hidden]
    assert len(order) == len(outcomes)
    assert order == sorted(order, key=["regressed", "unchanged", "improved", "failed"].index)


@needs_chromium
def test_screenshot(run, tmp_path: Path):
    folder, _ = run
    shot = tmp_path / "report.png"
    done = chromium(
        tmp_path,
        (folder / "report.html").as_uri() + "#filter=all",
        f"--screenshot={shot}",
        "--window-size=1280,2000",
    )
    assert console_errors(done.stderr) == []
    assert shot.is_file() and shot.stat().st_size > 20_000
    assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    print(f"report.html screenshot: {shot}")


def test_nasty_text_is_in_the_rows():  # the escaping tests above mean something only if the rows carry it
    assert "<script>" in NASTY and "&" in NASTY


def test_an_sft_rows_greedy_answers_and_the_guard_are_on_the_page(tmp_path: Path):
    from result_folders import sft_rows

    base, trained = sft_rows()
    base[0].answer, trained[0].answer = "I would say <four>", "The answer is 4 & no more."
    write_run(tmp_path, "answers", rows=(base, trained))
    page = (tmp_path / "report.html").read_text()
    # What each model now writes, beside the NLL of the reference (escaped like every text).
    assert "I would say &lt;four&gt;" in page and "The answer is 4 &amp; no more." in page
    assert 'Guard: <span class="verdict unsure">not evaluated</span>' in page  # this run had no guard set
