"""How samples are split into train and val: by a hash of the id, by a dataset's own split, or by
whole groups (a regex on the id names each sample's group: a drive, a KITTI category). Planned
once, before anything is written, and recorded in the manifest.
"""
from __future__ import annotations

import hashlib
import itertools
import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from raytrain.config import WORST_GROUP
from raytrain.data.formats import Sample
from raytrain.errors import DataError

# A group names metric keys (val_iou@<group>): Tune, TensorBoard and MLflow all take these characters.
GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def split_of(sample_id: str, val_fraction: float, seed: int) -> str:
    """Deterministic split by id: adding or removing other samples never moves this one."""
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


@dataclass(frozen=True)
class GroupSplit:
    """Whole groups of samples to val: `group_by` the regex, `groups` each sample id's group."""

    group_by: str
    groups: dict[str, str]
    val_groups: tuple[str, ...]

    def split_of(self, sample_id: str) -> str:
        return "val" if self.groups[sample_id] in self.val_groups else "train"


def group_of(sample_id: str, pattern: re.Pattern) -> str | None:
    """The sample's group: the regex's first capture group if it has one, else what it matches."""
    found = pattern.search(sample_id)
    return (found.group(1 if pattern.groups else 0) or None) if found else None


def choose_val_groups(sizes: dict[str, int], val_fraction: float, seed: int) -> tuple[str, ...]:
    """A seeded choice of whole groups (at least one, never all) whose samples come closest to
    val_fraction of all. Groups are taken in an order drawn from (seed, name), so adding a group
    does not reorder the others."""
    order = sorted(sizes, key=lambda name: hashlib.sha256(f"{seed}:{name}".encode()).digest())
    covered = list(itertools.accumulate(sizes[name] for name in order))
    target = val_fraction * covered[-1]
    count = min(range(1, len(order)), key=lambda k: abs(covered[k - 1] - target))
    return tuple(sorted(order[:count]))


def plan_group_split(ids: Sequence[str], group_by: str, val_groups: Sequence[str] | None,
                     val_fraction: float, seed: int) -> GroupSplit:
    """Every id's group by the regex `group_by`, and the groups that go to val: `val_groups`, or a
    seeded choice covering about val_fraction of the samples. Raises a one-line DataError naming
    the flag on a regex that does not compile or misses an id, an unknown group, or an empty split."""
    flag = f"--group-by {group_by!r}"
    try:
        pattern = re.compile(group_by)
    except re.error as err:
        raise DataError(f"{flag}: not a regular expression ({err})") from None
    groups = {sample_id: group_of(sample_id, pattern) for sample_id in ids}
    missed = [sample_id for sample_id, group in groups.items() if group is None]
    if len(missed) == len(ids):
        raise DataError(f"{flag}: matches none of the {len(ids)} sample ids (e.g. {ids[0]!r})")
    if missed:
        raise DataError(f"{flag}: does not match sample id {missed[0]!r} ({len(missed)} of {len(ids)} ids); every sample needs a group")
    for sample_id, group in groups.items():
        if group == WORST_GROUP:
            raise DataError(f"{flag}: group {group!r} of sample {sample_id!r} is a name raytrain keeps: "
                            f"val_iou@{WORST_GROUP} is the lowest group's score")
        if not GROUP_NAME.fullmatch(group):
            raise DataError(f"{flag}: group {group!r} of sample {sample_id!r} is not a name of letters, digits, _, - and . "
                            "(it names metric keys)")
    sizes = dict(sorted(Counter(groups.values()).items()))
    chosen = _val_groups(flag, sizes, val_groups, val_fraction, seed)
    return GroupSplit(group_by, groups, chosen)


def _val_groups(flag: str, sizes: dict[str, int], val_groups, val_fraction: float, seed: int) -> tuple[str, ...]:
    known = ", ".join(list(sizes)[:12]) + (", ..." if len(sizes) > 12 else "")
    if len(sizes) < 2:
        raise DataError(f"{flag}: one group ({known}) cannot be split into train and val; use a regex that finds several")
    if val_groups is None:
        if val_fraction <= 0:
            raise DataError(f"{flag} with --val-fraction 0 puts no group in val; give --val-groups or a --val-fraction above 0")
        return choose_val_groups(sizes, val_fraction, seed)
    chosen = tuple(sorted(set(val_groups)))
    if not chosen:
        raise DataError(f"--val-groups: no group given (groups of {flag}: {known})")
    unknown = [name for name in chosen if name not in sizes]
    if unknown:
        raise DataError(f"--val-groups {unknown[0]!r}: no such group (groups of {flag}: {known})")
    if len(chosen) == len(sizes):
        raise DataError(f"--val-groups {','.join(chosen)}: every group in val leaves no training samples")
    return chosen


@dataclass(frozen=True)
class SplitRule:
    """How samples are split: by id (val_fraction, seed), by a dataset's own split, or by whole groups."""

    val_fraction: float
    seed: int
    grouping: GroupSplit | None

    def of(self, sample: Sample) -> str:
        if self.grouping:
            return self.grouping.split_of(sample.id)
        return sample.split or split_of(sample.id, self.val_fraction, self.seed)

    def describe(self) -> dict:
        described = {"val_fraction": self.val_fraction, "seed": self.seed}
        if self.grouping:
            described.update(group_by=self.grouping.group_by, val_groups=list(self.grouping.val_groups))
        return described
