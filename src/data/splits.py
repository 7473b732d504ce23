"""Seeded splits of an image list: a stratified closed-set split and an open-set hold-out.

Closed set (`stratified_split`): every individual is split on its own, so each split holds every
individual in (nearly) the requested proportion. Per individual with n images, `split_counts` gives
each split the whole part of `n * fraction`, hands the images left over one at a time to the splits
with the largest fractional parts (ties: train, then val, then test), and finally makes sure every
split holds at least one image by taking from the largest split. With the default 70/15/15:

    n        3      4      5      6      7      8      9      10     20      100
    train    1      2      3      4      5      6      6      7      14      70
    val      1      1      1      1      1      1      2      2      3       15
    test     1      1      1      1      1      1      1      1      3       15

so small individuals keep slightly more than 15% in val and test; an individual needs at least 3
images (one per split).

Which images go where is drawn with a generator seeded by `(seed, individual)`, so an individual's
split does not change when other individuals are added, renamed or dropped (e.g. by a labels fix).

Open set (`open_set_split`): a seeded choice of individuals is held out entirely. The known
individuals keep the closed-set split rows, so closed- and open-set results are comparable. The
held-out individuals are divided into two disjoint groups, `unknown_val` (for choosing a rejection
threshold) and `unknown_test` (for measuring it), so that the threshold is tested on animals it was
never tuned on.
"""
from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence
from fractions import Fraction

from src.data.lists import Row

SPLITS = ("train", "val", "test")
UNKNOWN_SPLITS = ("unknown_val", "unknown_test")  # open set: the held-out individuals' images
DEFAULT_FRACTIONS = (0.70, 0.15, 0.15)
MIN_IMAGES_PER_INDIVIDUAL = len(SPLITS)


class SplitError(ValueError):
    """Split parameters that cannot be met; the message says which."""


def split_counts(n: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> tuple[int, int, int]:
    """Images per split (train, val, test) for an individual with n images; see the module doc."""
    _check_fractions(fractions)
    if n < MIN_IMAGES_PER_INDIVIDUAL:
        raise SplitError(f"an individual with {n} image(s) cannot appear in train, val and test")
    # As the decimals written (0.7 is 7/10): in binary floating point 8 x 0.2 has a larger remainder
    # than 8 x 0.7, which broke the tie rule.
    exact = [n * Fraction(str(f)) for f in fractions]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(3), key=lambda i: -(exact[i] - counts[i]))  # stable: train first
    for i in by_remainder[:n - sum(counts)]:
        counts[i] += 1
    for i in range(3):  # train too: --fractions 0.1 0.45 0.45 left it empty for n = 3, 4, 6
        if counts[i] == 0:
            counts[max(range(3), key=lambda j: counts[j])] -= 1
            counts[i] = 1
    return counts[0], counts[1], counts[2]


def _check_fractions(fractions: Sequence[float]) -> None:
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or not math.isclose(sum(fractions), 1.0):
        raise SplitError(f"split fractions {list(fractions)} must be three positive numbers summing to 1")


def group_by_individual(rows: Sequence[Row]) -> dict[str, list[str]]:
    """{individual: sorted paths}; sorting makes the split independent of the input order."""
    groups: dict[str, list[str]] = defaultdict(list)
    for path, name in rows:
        groups[name].append(path)
    return {name: sorted(paths) for name, paths in sorted(groups.items())}


def stratified_split(rows: Sequence[Row], fractions: Sequence[float] = DEFAULT_FRACTIONS,
                     seed: int = 0) -> dict[str, list[Row]]:
    """{"train"|"val"|"test": rows sorted by path}; every individual in every split."""
    result: dict[str, list[Row]] = {name: [] for name in SPLITS}
    for individual, paths in group_by_individual(rows).items():
        try:
            n_train, n_val, _ = split_counts(len(paths), fractions)
        except SplitError as exc:
            raise SplitError(f"{individual}: {exc}") from None
        random.Random(f"{seed}/{individual}").shuffle(paths)  # a fresh list, from group_by_individual
        parts = {"train": paths[:n_train], "val": paths[n_train:n_train + n_val], "test": paths[n_train + n_val:]}
        for split, part in parts.items():
            result[split] += [(p, individual) for p in part]
    return {split: sorted(part) for split, part in result.items()}


def choose_unknown(individuals: Sequence[str], count: int, seed: int = 0) -> list[str]:
    """A seeded, sorted choice of `count` individuals to hold out of training entirely.

    At least 2 are needed (one for `unknown_val`, one for `unknown_test`) and at least 2 must stay
    known, otherwise there is no identification task left to reject unknowns from.
    """
    names = sorted(set(individuals))
    if count < 2 or count > len(names) - 2:
        possible = f" (or 2 to {len(names) - 2})" if len(names) >= 4 else ""
        raise SplitError(f"cannot hold out {count} of {len(names)} individuals for the open-set split: "
                         f"need at least 2 held out and 2 known; --open-set-individuals 0 skips it{possible}")
    return sorted(random.Random(f"{seed}/open-set").sample(names, count))


def open_set_split(closed: dict[str, list[Row]], unknown: Sequence[str]) -> dict[str, list[Row]]:
    """Closed-set splits restricted to known individuals, plus `unknown_val` / `unknown_test`.

    The held-out individuals are divided by individual: the alphabetically first half goes to
    `unknown_val`, the rest (one more when the count is odd) to `unknown_test`; each takes all images
    of its individuals.
    """
    unknown = sorted(unknown)
    unknown_set = set(unknown)
    val_ids = set(unknown[: len(unknown) // 2])
    result = {split: [r for r in rows if r[1] not in unknown_set] for split, rows in closed.items()}
    everything = sorted(r for rows in closed.values() for r in rows if r[1] in unknown_set)
    result["unknown_val"] = [r for r in everything if r[1] in val_ids]
    result["unknown_test"] = [r for r in everything if r[1] not in val_ids]
    return result
