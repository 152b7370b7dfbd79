"""The README is the short tour and docs/ holds the details (issue 37). The README stays short; every relative
link in it and in docs/ leads to a file (and a heading) that exists; every `posttrain` command the README's
commands block lists is one the `posttrain` command offers, and the reverse; and a few bad inputs the docs
quote are refused as the docs say: one `error:` line naming the option, exit code 2, nothing written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from runs import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
MAX_README_LINES = 250
CLI = "posttrain.cli.main"  # `python -m` it: the `posttrain` script's main (pyproject's [project.scripts])
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where a `[x](y)` is not a link."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def _slugs(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces as hyphens."""
    slugs: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", FENCE.sub("", page.read_text(encoding="utf-8")), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n, unique = 0, slug
        while unique in slugs:
            n += 1
            unique = f"{slug}-{n}"
        slugs.add(unique)
    return slugs


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def test_the_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move details to a page under docs/"


def test_every_relative_link_leads_somewhere():
    broken, checked = [], 0
    for page in _pages():
        for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            checked += 1
            if not linked.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _slugs(linked):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert broken == []
    assert checked >= 30  # the README's table and the pages' cross-links, not a vacuous pass


def _readme_commands() -> list[str]:
    """The `posttrain` commands the README's commands block names (the first code block of "## Commands")."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("\n## Commands\n") :]
    block = FENCE.search(section)
    assert block is not None
    return list(dict.fromkeys(re.findall(r"^uv run posttrain ([a-z][a-z-]*)", block.group(0), re.M)))


def _offered_commands() -> set[str]:
    """The commands `posttrain` with no arguments lists."""
    proc = subprocess.run([sys.executable, "-m", CLI], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    listing = proc.stdout.split("commands:", 1)[1]
    return set(re.findall(r"^  ([a-z][a-z-]*)(?:\s|$)", listing, re.M))


def test_the_readmes_commands_are_the_ones_posttrain_offers():
    listed, offered = _readme_commands(), _offered_commands()
    assert {"train", "serve", "runs", "chat", "export", "serve-model", "examples", "cache"} <= set(listed)
    assert [c for c in listed if c not in offered] == [], f"posttrain offers {sorted(offered)}"
    assert sorted(offered - set(listed)) == [], "a command posttrain offers is not in the README's block"


# (command line, the docs page that quotes the refusal, its quote there, what the one error line must hold)
KL_FOR_SFT = (
    "kl_discount_factor is not used by task=sft "
    "(only by task=distillation, rubric, rl, rlhf, pairwise_rl); leave it out"
)
NO_FUNCTION = "has no function 'nope' (functions there: score)"
NO_RUN = "nope: no run of that name in results/ and no summary.json in a folder nope"
REFUSALS = [
    (
        ["train", "nope=1", "backend=local"],
        "tinker.md",
        "This configuration is not currently available in the Tinker training configs.",
        [
            "This configuration is not currently available in the Tinker training configs.",
            "Unsupported: nope",
        ],
    ),
    (
        ["train", "task=sft", "kl_discount_factor=0.9", "backend=local"],
        "settings.md",
        KL_FOR_SFT,
        [KL_FOR_SFT],
    ),
    (
        ["train", "env=math", "reward_fn=v.py:nope", "backend=local"],
        "rl.md",
        NO_FUNCTION,
        ["reward_fn=v.py:nope:", NO_FUNCTION],
    ),
    (
        ["train", "dataset=missing.jsonl", "backend=local"],
        "watching-and-resuming.md",
        "naming the option, file or URL",
        ["missing.jsonl"],
    ),
    (
        ["train", "model_name=no/such-model", "backend=local"],
        "watching-and-resuming.md",
        "a model the backend cannot serve",
        ["model_name=no/such-model"],
    ),
    (
        ["train", "env=game:tic_tac_toe", "game_opponent=self", "group_size=3", "backend=local"],
        "rl-games.md",
        "an odd one is refused in one line",
        ["game_opponent=self", "group_size", "3"],
    ),
    (
        ["train", "corpus=docs.jsonl", "backend=local"],
        "rl-tools.md",
        "`corpus=` or `retriever=` without `env=tools:search`",
        ["corpus", "env=tools:search"],
    ),
    (["runs", "nope", "demo1"], "after-training.md", f"error: {NO_RUN}", [NO_RUN]),
    (
        ["cache", "prune", "older_than=7x"],
        "local-engine.md",
        "a bad duration or an unknown run is one line, exit code 2",
        ["older_than=7x"],
    ),
]


@pytest.mark.parametrize(
    ("argv", "page", "quote", "expected"), REFUSALS, ids=[" ".join(r[0][:2]) for r in REFUSALS]
)
def test_a_documented_refusal_is_one_line_and_exit_code_2(
    argv: list[str], page: str, quote: str, expected: list[str], tmp_path: Path
):
    """Run as a user runs it, in a folder of its own: refused before anything is trained or written."""
    documented = " ".join((DOCS / page).read_text(encoding="utf-8").split())
    assert quote in documented, f"docs/{page} no longer quotes it"
    (tmp_path / "v.py").write_text("def score(row, completion):\n    return 1.0\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    env.pop("TINKER_API_KEY", None)
    proc = subprocess.run(
        [sys.executable, "-m", CLI, *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert [e for e in expected if e not in lines[0]] == [], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.py"]  # no results folder, nothing moved aside
