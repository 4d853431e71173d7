"""data/splits: the train/val split by id, and by group (`--group-by`), never one group in both."""

import re

import numpy as np
import pytest

from raytrain.data.splits import split_of
from raytrain.errors import DataError


def test_split_is_deterministic_by_id():
    splits = [split_of(f"um_{i:06d}", 0.2, seed=0) for i in range(1000)]
    assert splits == [split_of(f"um_{i:06d}", 0.2, seed=0) for i in range(1000)]
    assert 0.15 < splits.count("val") / 1000 < 0.25
    assert splits != [split_of(f"um_{i:06d}", 0.2, seed=1) for i in range(1000)]


def _random_ids(rng, count: int) -> list[str]:
    """Ids as datasets name them (a drive or category, a separator, a frame number), now and then odd."""
    prefixes = ["0001TP", "0006R0", "0016E5", "Seq05VD", "um", "umm", "uu", "a", "b-c", "d.e"]
    separators = ["_", "_", "-", ""]
    ids = {f"{rng.choice(prefixes)}{rng.choice(separators)}{int(rng.integers(0, 10**rng.integers(1, 7))):06d}"
           for _ in range(count)}
    return sorted(ids)


REGEXES = [r"^[^_]+", r"^[^_-]+", r"^.{1,3}", r"\d{2}$", r"^(\w+?)_", r"[A-Z]+", r"^(.)", r"\d", r"^\D+", r"[05]", r"@", r"(x)?"]


def test_group_by_never_puts_one_group_in_both_splits():
    from raytrain.data.splits import group_of, plan_group_split

    rng = np.random.default_rng(0)
    planned = refused = 0
    for case in range(400):
        ids = _random_ids(rng, int(rng.integers(1, 60)))
        regex = str(rng.choice(REGEXES))
        named = None
        if rng.random() < 0.3:  # some of the groups the regex finds, by name
            found = sorted({g for g in (group_of(i, re.compile(regex)) for i in ids) if g})
            named = list(rng.choice(found, size=int(rng.integers(1, len(found) + 1)), replace=False)) if found else ["x"]
        try:
            split = plan_group_split(ids, regex, named, float(rng.uniform(0, 0.9)), int(rng.integers(0, 5)))
        except DataError as err:  # a regex that misses an id, one group, every group named: said, never half-split
            assert str(err).startswith(("--group-by", "--val-groups")), err
            refused += 1
            continue
        planned += 1
        by_group: dict[str, set[str]] = {}
        for sample_id in ids:
            assert split.groups[sample_id] == group_of(sample_id, re.compile(regex))
            by_group.setdefault(split.groups[sample_id], set()).add(split.split_of(sample_id))
        assert all(len(splits) == 1 for splits in by_group.values()), (case, regex, by_group)
        assert {s for splits in by_group.values() for s in splits} == {"train", "val"}, (case, regex)
        assert set(split.val_groups) == {g for g, splits in by_group.items() if splits == {"val"}}
        if named is not None:
            assert set(split.val_groups) == set(named)
    assert planned > 100 and refused > 50  # both kinds of outcome were exercised


def test_seeded_val_groups_cover_about_the_val_fraction():
    from raytrain.data.splits import choose_val_groups

    rng = np.random.default_rng(1)
    for _ in range(200):
        sizes = {f"g{i}": int(rng.integers(1, 50)) for i in range(int(rng.integers(2, 30)))}
        fraction, seed = float(rng.uniform(0.05, 0.5)), int(rng.integers(0, 3))
        chosen = choose_val_groups(sizes, fraction, seed)
        assert chosen == choose_val_groups(dict(reversed(sizes.items())), fraction, seed)  # not by listing order
        assert 0 < len(chosen) < len(sizes)
        share, total = sum(sizes[g] for g in chosen), sum(sizes.values())
        target = fraction * total
        # a prefix of a seeded order: within one group of the target, or the first group on its own
        assert abs(share - target) <= max(sizes.values()) or len(chosen) == 1


def test_a_group_named_worst_is_refused_it_names_the_lowest_groups_score():
    from raytrain.data.splits import plan_group_split

    with pytest.raises(DataError, match="group 'worst' of sample 'worst_000001' is a name raytrain keeps"):
        plan_group_split(["best_000000", "worst_000001"], "^[^_]+", None, 0.5, 0)
