"""The README and the docs/ pages link to each other's sections: every relative link must name a file
that exists and, with `#anchor`, a heading that the file has (GitHub's anchors), and every code fence
must close (an open one swallows the rest of the page). Error lines and limits the pages quote are
the ones the code prints and enforces."""
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


def flat_text(path: Path) -> str:
    """The page with its line breaks and runs of spaces as single spaces: a quoted line may be wrapped."""
    return re.sub(r"\s+", " ", path.read_text(encoding="utf-8"))


def test_quoted_config_errors_are_the_ones_the_code_prints(monkeypatch):
    from src.config import ConfigError, config_from_dict, load_config

    with pytest.raises(ConfigError) as unknown_key:
        config_from_dict({"trainer": {"max_epoch": 3}})
    monkeypatch.chdir(REPO)  # the suggestion searches configs/ in the working folder
    with pytest.raises(ConfigError) as missing_config:
        load_config("configs/train_chimp_min10.yml")
    for page in (REPO / "README.md", REPO / "docs" / "TRAINING.md"):
        assert f"error: {unknown_key.value}" in flat_text(page), page.name
    assert f"`error: {missing_config.value}`" in flat_text(REPO / "docs" / "TRAINING.md")


def test_quoted_torchrun_gpu_refusal_is_the_one_the_code_prints(monkeypatch):
    from src.config import ConfigError
    from src.training import distributed

    for name, value in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError) as refusal:  # before any process group or CUDA call
        distributed.init_distributed("cuda")
    quoted = re.search(r"`\[rank 3\] error: (torchrun: [^`]*?)\.\.\.`", flat_text(REPO / "docs" / "TRAINING.md"))
    assert quoted and str(refusal.value).startswith(quoted.group(1))


def test_standin_limits_quoted_in_the_docs_are_the_code_s():
    from src.data.standin import CALIBRATE_MAX_GIB, MAX_SIZE, MIN_SIZE

    standin = flat_text(REPO / "docs" / "STANDIN.md")
    assert f"refuses a set that would take more than {CALIBRATE_MAX_GIB} GiB" in standin
    assert f"`--size S` | nominal side in pixels, {MIN_SIZE} to {MAX_SIZE} (default 128" in standin
    assert f"`--size S` ({MIN_SIZE} to {MAX_SIZE}, default 128)" in flat_text(REPO / "README.md")


def test_quoted_first_learning_rates_are_the_configs():
    """docs/TRAINING.md quotes the epoch line's first rates of the 200-epoch and the baseline config on
    the min10 set (5,007 training images): each epoch shows the rate of its last step."""
    from src.config import load_config
    from src.training.train import lr_lambda

    def first_rates(config_name: str, epochs: int) -> str:
        config = load_config(REPO / "configs" / f"{config_name}.yaml")
        steps = 5007 // config.trainer.batch_size
        factor = lr_lambda(config, steps)
        return ", ".join(f"lr={config.trainer.lr * factor(epoch * steps - 1):.5f}" for epoch in range(1, epochs + 1))

    assert first_rates("train_chimp_min10_resnet50_arc_full", 3) == "lr=0.00016, lr=0.00032, lr=0.00048"
    assert first_rates("train_chimp_min10", 2) == "lr=0.00020, lr=0.00040"
    text = flat_text(REPO / "docs" / "TRAINING.md")
    assert "show `lr=0.00016`, `0.00032`, `0.00048`" in text and "shows `lr=0.00020`, then `0.00040`" in text
