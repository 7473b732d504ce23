"""The README and the docs/ pages link to each other's sections: every relative link must name a file
that exists and, with `#anchor`, a heading that the file has (GitHub's anchors), and every code fence
must close (an open one swallows the rest of the page)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import REPO

PAGES = [REPO / "README.md", REPO / "data" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation but '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def prose_lines(path: Path):
    """(line number, line) outside code fences; raises AssertionError for a fence left open."""
    opened_at = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            opened_at = None if opened_at else number
        elif opened_at is None:
            yield number, line
    assert opened_at is None, f"{path.name}:{opened_at}: code fence never closed"


def anchors(path: Path) -> set[str]:
    found: dict[str, int] = {}
    for _, line in prose_lines(path):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if heading:
            anchor = github_anchor(heading.group(1))
            found[anchor] = found.get(anchor, -1) + 1  # GitHub numbers repeats: a, a-1, a-2
    return {f"{anchor}-{i}" if i else anchor for anchor, repeats in found.items() for i in range(repeats + 1)}


def test_github_anchors():
    assert github_anchor("Scores and `unknown`") == "scores-and-unknown"
    assert github_anchor("The public C-Zoo / C-Tai release") == "the-public-c-zoo--c-tai-release"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_links_name_existing_files_and_headings(page):
    broken = []
    for number, line in prose_lines(page):
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):  # not inside inline code
            if re.match(r"^[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            destination = (page.parent / file).resolve() if file else page
            if not destination.exists():
                broken.append(f"{number}: {target} (no such file)")
            elif anchor and (destination.suffix != ".md" or anchor not in anchors(destination)):
                broken.append(f"{number}: {target} (no such heading)")
    assert not broken, f"{page.name}: " + "; ".join(broken)
