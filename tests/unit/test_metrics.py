import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import accuracy_score, f1_score, jaccard_score, precision_score, recall_score

from raytrain.metrics import SegmentationMetrics
from tests.helpers import free_port
from tests.helpers import forkserver

IGNORE = 255


def _binary_data(seed, n=2, size=16, ignore_fraction=0.2):
    g = torch.Generator().manual_seed(seed)
    target = (torch.rand(n, size, size, generator=g) < 0.4).long()
    # half of the probabilities exactly on the KITTI grid i/255 (as KITTI's 8-bit maps), the rest free
    probs = torch.rand(n, 1, size, size, generator=g)
    on_grid = torch.randint(0, 256, probs.shape, generator=g).float() / 255
    probs = torch.where(torch.rand(probs.shape, generator=g) < 0.5, on_grid, probs)
    target[torch.rand(n, size, size, generator=g) < ignore_fraction] = IGNORE
    return probs, target


def _multiclass_data(seed, num_classes=4, n=2, size=16, absent=None):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, num_classes, size, size, generator=g)
    target = torch.randint(0, num_classes, (n, size, size), generator=g)
    if absent is not None:  # never true, never predicted
        logits[:, absent] = -100.0
        target[target == absent] = (absent + 1) % num_classes
    target[torch.rand(n, size, size, generator=g) < 0.2] = IGNORE
    return logits, target


def _valid_pixels(scores, target, binary):
    valid = target != IGNORE
    y_true = target[valid].numpy()
    y_pred = (scores[:, 0] > 0.5)[valid].long().numpy() if binary else scores.argmax(1)[valid].numpy()
    return y_true, y_pred


def _sklearn_binary(scores, target):
    y_true, y_pred = _valid_pixels(scores, target, binary=True)
    kw = dict(zero_division=0, pos_label=1, average="binary", labels=[0, 1])
    return {
        "accuracy": accuracy_score(y_true, y_pred),
        "precision": precision_score(y_true, y_pred, **kw),
        "recall": recall_score(y_true, y_pred, **kw),
        "f1": f1_score(y_true, y_pred, **kw),
        "iou": jaccard_score(y_true, y_pred, **kw),
    }


def _reference_maxf_ap(probs, target):
    """Loop over the KITTI thresholds i/255: road iff p >= t (as evalExp's histogram), then pxEval."""
    valid = target != IGNORE
    p = probs[:, 0][valid].double().numpy()
    gt = target[valid].numpy() == 1
    thresholds = np.array(range(256)) / 255.0
    tp = np.array([np.sum(gt & (p >= t)) for t in thresholds], dtype=float)
    fp = np.array([np.sum(~gt & (p >= t)) for t in thresholds], dtype=float)
    # the devkit's own histogram formulation gives the same counts
    edges = np.concatenate(([-np.inf], thresholds, [np.inf]))
    assert np.array_equal(gt.sum() - np.cumsum(np.histogram(p[gt], bins=edges)[0])[:256], tp)
    assert np.array_equal(np.flipud(np.cumsum(np.flipud(np.histogram(p[~gt], bins=edges)[0])))[1:257], fp)
    if gt.sum() == 0:
        return 0.0, 0.0
    recall = tp / float(gt.sum())
    precision = tp / (tp + fp + 1e-10)
    keep = ~((recall == 0) & (precision == 0))
    recall, precision = recall[keep], precision[keep]
    ap = np.mean([max(precision[np.where(recall >= level)]) for level in np.arange(0, 1.1, 0.1)])
    maxf = np.max(2 * precision * recall / (precision + recall + 1e-10))
    return maxf, ap


def _check_binary(probs, target):
    metrics = SegmentationMetrics(1)
    metrics.update(probs, target)
    result = metrics.compute()
    expected = _sklearn_binary(probs, target)
    expected["iou_road"] = expected["iou"]
    expected["maxf"], expected["ap"] = _reference_maxf_ap(probs, target)
    assert set(result) == set(expected)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-6), key


def _binary_edge_cases():
    probs, target = _binary_data(1)
    labelled = target != IGNORE
    perfect = target.clamp(max=1).float().unsqueeze(1)
    yield "random", probs, target
    yield "all correct", perfect, target
    yield "all wrong", 1 - perfect, target
    yield "no road in truth", probs, torch.where(labelled, 0, IGNORE)
    yield "no road predicted", probs * 0.5, target
    yield "no ignore", probs, target.clamp(max=1)
    yield "everything road", torch.ones_like(probs), target


@pytest.mark.parametrize("case", list(_binary_edge_cases()), ids=lambda c: c[0])
def test_binary_matches_sklearn_and_kitti_reference(case):
    _, probs, target = case
    _check_binary(probs, target)


def test_binary_from_logits_equals_probabilities():
    probs, target = _binary_data(2)
    from_probs, from_logits = SegmentationMetrics(1), SegmentationMetrics(1, from_logits=True)
    from_probs.update(probs, target)
    from_logits.update(torch.logit(probs.clamp(1e-4, 1 - 1e-4)).double(), target)
    a, b = from_probs.compute(), from_logits.compute()
    for key in ("accuracy", "precision", "recall", "f1", "iou"):
        assert a[key] == pytest.approx(b[key], abs=1e-6)


def test_binary_with_everything_ignored_is_zero():
    metrics = SegmentationMetrics(1)
    probs, _ = _binary_data(3)
    metrics.update(probs, torch.full((2, 16, 16), IGNORE))
    assert all(value == 0.0 for value in metrics.compute().values())


def _check_multiclass(scores, target, num_classes, from_logits):
    metrics = SegmentationMetrics(num_classes, class_names=[f"c{i}" for i in range(num_classes)], from_logits=from_logits)
    metrics.update(scores, target)
    result = metrics.compute()
    y_true, y_pred = _valid_pixels(scores, target, binary=False)
    present = sorted(set(y_true) | set(y_pred))
    assert result["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-6)
    for metric, fn in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score), ("iou", jaccard_score)):
        macro = fn(y_true, y_pred, average="macro", zero_division=0)
        assert result[metric] == pytest.approx(macro, abs=1e-6), metric
        per_class = dict(zip(present, fn(y_true, y_pred, average=None, labels=present, zero_division=0)))
        for c in range(num_classes):
            value = result[f"{metric}_c{c}"]
            if c in per_class:
                assert value == pytest.approx(per_class[c], abs=1e-6), (metric, c)
            else:
                assert math.isnan(value), (metric, c)
    return result


def _multiclass_edge_cases():
    logits, target = _multiclass_data(4)
    truth = target.clamp(max=3)
    perfect = torch.nn.functional.one_hot(truth, 4).permute(0, 3, 1, 2).float()
    yield "random", logits, target, True
    yield "probabilities", logits.softmax(1), target, False
    yield "class absent", *_multiclass_data(5, absent=2), True
    yield "all correct", perfect, target, False
    yield "all wrong", perfect.roll(1, dims=1), target, False
    yield "only class 0 predicted", torch.tensor([1.0, 0, 0, 0]).view(1, 4, 1, 1).expand_as(perfect), target, False


@pytest.mark.parametrize("case", list(_multiclass_edge_cases()), ids=lambda c: c[0])
def test_multiclass_matches_sklearn(case):
    _, scores, target, from_logits = case
    result = _check_multiclass(scores, target, 4, from_logits)
    assert "maxf" not in result and "ap" not in result


def test_absent_class_is_nan_and_left_out_of_macro_mean():
    logits, target = _multiclass_data(6, absent=1)
    result = _check_multiclass(logits, target, 4, True)
    assert math.isnan(result["iou_c1"])
    assert result["iou"] == pytest.approx(np.mean([result[f"iou_c{c}"] for c in (0, 2, 3)]))


def test_default_class_names():
    assert "iou_road" in _computed(SegmentationMetrics(1), *_binary_data(7))
    assert {"iou_0", "iou_1", "iou_2", "iou_3"} <= set(_computed(SegmentationMetrics(4), *_multiclass_data(7)))


def _computed(metrics, scores, target):
    metrics.update(scores, target)
    return metrics.compute()


@pytest.mark.parametrize("binary", [True, False])
def test_several_updates_equal_one_update_on_everything(binary):
    batches = [_binary_data(s) if binary else _multiclass_data(s) for s in range(10, 14)]
    num_classes = 1 if binary else 4
    accumulated = SegmentationMetrics(num_classes)
    for scores, target in batches:
        accumulated.update(scores, target)
    everything = SegmentationMetrics(num_classes)
    everything.update(torch.cat([s for s, _ in batches]), torch.cat([t for _, t in batches]))
    assert accumulated.compute() == pytest.approx(everything.compute(), abs=1e-12, nan_ok=True)
    assert accumulated.compute() == pytest.approx(everything.compute(), abs=1e-12, nan_ok=True)  # idempotent
    accumulated.reset()
    accumulated.update(*batches[0])
    assert accumulated.compute() == pytest.approx(_computed(SegmentationMetrics(num_classes), *batches[0]), nan_ok=True)


def test_target_out_of_range_raises():
    probs, target = _binary_data(8)
    target[0, 0, 0] = 2
    with pytest.raises(ValueError):
        SegmentationMetrics(1).update(probs, target)
    with pytest.raises(ValueError):
        SegmentationMetrics(3).update(probs, target)  # wrong channel count


# ---------------------------------------------------------------- per group: each group's pooled counts


def _numpy_group_scores(y_true: np.ndarray, y_pred: np.ndarray, binary: bool, num_classes: int) -> tuple[float, float]:
    """(iou, f1) from one confusion matrix of all the group's pixels: the road class's, or the macro
    mean over the classes that occur (in truth or prediction); 0 where a denominator is 0."""
    size = 2 if binary else num_classes
    confusion = np.zeros((size, size), np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    tp = np.diag(confusion).astype(float)
    fp, fn = confusion.sum(0) - tp, confusion.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), 0.0)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    if binary:
        return iou[1], f1[1]
    present = tp + fp + fn > 0
    return (iou[present].mean(), f1[present].mean()) if present.any() else (0.0, 0.0)


@pytest.mark.parametrize("num_classes", [1, 4])
def test_per_group_metrics_are_each_groups_pooled_counts(num_classes):
    rng = np.random.default_rng(30 + num_classes)
    binary = num_classes == 1
    names = ["0001TP", "0006R0", "0016E5", "empty"]
    for case in range(20):
        n = int(rng.integers(1, 9))
        scores, target = _binary_data(case, n=n) if binary else _multiclass_data(case, n=n)
        groups = rng.integers(0, 3, n)  # "empty" never has an image: its scores are 0
        target[rng.random(target.shape) < rng.random()] = IGNORE  # images hold different numbers of labelled pixels
        metrics = SegmentationMetrics(num_classes, groups=names)
        for batch in np.array_split(np.arange(n), int(rng.integers(1, n + 1))):  # batches mix groups
            metrics.update(scores[batch], target[batch], torch.from_numpy(groups[batch]))
        result = metrics.compute()
        assert set(result) >= {f"{metric}@{name}" for metric in ("iou", "f1") for name in names}
        for index, name in enumerate(names):
            chosen = groups == index
            y_true, y_pred = _valid_pixels(scores[chosen], target[chosen], binary)
            iou, f1 = _numpy_group_scores(y_true, y_pred, binary, num_classes)
            assert result[f"iou@{name}"] == pytest.approx(iou, abs=1e-12), (case, name)
            assert result[f"f1@{name}"] == pytest.approx(f1, abs=1e-12), (case, name)
    # Pooled, not a mean of per-image scores: on such data the two differ.
    per_image = [_numpy_group_scores(*_valid_pixels(scores[i : i + 1], target[i : i + 1], binary), binary, num_classes)[0]
                 for i in np.flatnonzero(groups == groups[0])]
    if len(per_image) > 1:
        assert result[f"iou@{names[groups[0]]}"] != pytest.approx(np.mean(per_image), abs=1e-9)


def test_the_worst_group_scores_are_the_lowest_groups_each():
    names = ["a", "b", "c"]
    lowest = set()
    for case in range(10):
        scores, target = _binary_data(100 + case, n=6)
        groups = np.arange(6) % 3
        metrics = SegmentationMetrics(1, groups=names)
        metrics.update(scores, target, torch.from_numpy(groups))
        result = metrics.compute()
        per_group = {name: _numpy_group_scores(*_valid_pixels(scores[groups == index], target[groups == index], True), True, 1)
                     for index, name in enumerate(names)}
        assert result["iou@worst"] == pytest.approx(min(iou for iou, _ in per_group.values()), abs=1e-12), case
        assert result["f1@worst"] == pytest.approx(min(f1 for _, f1 in per_group.values()), abs=1e-12), case
        lowest.add(min(per_group, key=lambda name: per_group[name][0]))
    assert len(lowest) > 1  # not always the same group
    with pytest.raises(ValueError, match="may not be named 'worst'"):
        SegmentationMetrics(1, groups=["a", "worst"])
    ungrouped = SegmentationMetrics(1)
    ungrouped.update(*_binary_data(0))
    assert not [key for key in ungrouped.compute() if "@" in key]


def test_groups_must_come_with_every_update_and_be_in_range():
    probs, target = _binary_data(9)
    with pytest.raises(ValueError, match="groups"):
        SegmentationMetrics(1, groups=["a", "b"]).update(probs, target)
    with pytest.raises(ValueError, match="groups"):
        SegmentationMetrics(1).update(probs, target, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="2 group names"):
        SegmentationMetrics(1, groups=["a", "b"]).update(probs, target, torch.tensor([0, 2]))
    assert not any("@" in key for key in _computed(SegmentationMetrics(1), probs, target))


# ---------------------------------------------------------------- DDP: counts are summed over ranks


def _ddp_worker(rank, port, cases):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for num_classes, scores, target, expected in cases:
            metrics = SegmentationMetrics(num_classes, groups=GROUPS)
            half = scores.size(0) // 2
            part = slice(rank * half, (rank + 1) * half)
            metrics.update(scores[part], target[part], IMAGE_GROUPS[part], ids=IDS[part])
            result = metrics.compute()
            assert result == pytest.approx(expected, abs=1e-12, nan_ok=True), (rank, num_classes, result, expected)
    finally:
        dist.destroy_process_group()


GROUPS = ["a", "b"]
IMAGE_GROUPS = torch.tensor([0, 1, 0, 1])  # each rank holds part of each group
IDS = ["f3", "f0", "f2", "f1"]  # out of frame order, and each rank holds frames of both halves of it


def test_all_reduced_metrics_equal_single_process_metrics():
    cases = []
    for num_classes, (scores, target) in ((1, _binary_data(20, n=4)), (4, _multiclass_data(21, n=4, absent=3))):
        metrics = SegmentationMetrics(num_classes, groups=GROUPS)
        metrics.update(scores, target, IMAGE_GROUPS, ids=IDS)
        cases.append((num_classes, scores, target, metrics.compute()))
        assert {"iou_low", "iou_high", "f1_low", "f1_high"} <= set(cases[-1][3])  # gathered from every rank
    # the halves really differ, also per group, so the test fails unless the counts are summed
    half = SegmentationMetrics(1, groups=GROUPS)
    half.update(cases[0][1][:2], cases[0][2][:2], IMAGE_GROUPS[:2])
    for key in ("iou", "iou@a", "f1@b"):
        assert half.compute()[key] != pytest.approx(cases[0][3][key])
    forkserver()  # preloaded: the workers skip importing torch
    mp.start_processes(_ddp_worker, args=(free_port(), cases), nprocs=2, join=True, start_method="forkserver")


# ---------------------------------------------------------------- intervals: a bootstrap over blocks of frames


def _frames(seed, n, size=8, road=0.5):
    """n images whose predictions are right with a chance that differs by image: pooled IoU varies
    from one draw of images to the next."""
    g = torch.Generator().manual_seed(seed)
    target = (torch.rand(n, size, size, generator=g) < road).long()
    right = torch.rand(n, 1, 1, generator=g) * 0.5 + 0.5
    flip = torch.rand(n, size, size, generator=g) > right
    probs = torch.where(flip, 1 - target, target).float()[:, None]
    return probs, target


def _pooled_iou(probs, target) -> float:
    road, truth = probs[:, 0] > 0.5, target == 1
    return ((road & truth).sum() / (road | truth).sum()).item()


def _interval(probs, target, ids=None):
    metrics = SegmentationMetrics(1)
    metrics.update(probs, target, ids=ids if ids is not None else [f"{i:05d}" for i in range(len(target))])
    return metrics.compute()


def test_the_interval_holds_the_score_and_its_width_is_the_spread_of_the_score_over_draws_of_images():
    scores = _interval(*_frames(0, 300))
    assert scores["iou_low"] < scores["iou"] < scores["iou_high"] and scores["f1_low"] < scores["f1"] < scores["f1_high"]
    # the reference: the score's spread over 200 independent draws of 300 images
    spread = np.std([_pooled_iou(*_frames(seed, 300)) for seed in range(1, 201)])
    width = (scores["iou_high"] - scores["iou_low"]) / (2 * 1.96)
    assert 0.7 * spread < width < 1.3 * spread, (width, spread)


def test_the_interval_repeats_and_does_not_depend_on_the_order_images_came_in():
    probs, target = _frames(3, 40)
    ids = [f"{i:05d}" for i in range(40)]
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    assert _interval(probs, target, ids) == _interval(probs[order], target[order], [ids[i] for i in order])


def test_identical_images_have_an_interval_of_no_width():
    probs, target = _frames(4, 1)
    scores = _interval(probs.repeat(30, 1, 1, 1), target.repeat(30, 1, 1))
    assert scores["iou_low"] == pytest.approx(scores["iou"]) == pytest.approx(scores["iou_high"])


def test_frames_repeated_next_to_each_other_widen_the_interval_as_fewer_images_would():
    """Five copies of each frame, side by side (near-duplicates, as a drive's frames are): resampled
    in blocks, the interval is about as wide as the distinct frames' own, not as wide as 5x as many."""
    probs, target = _frames(5, 60)
    distinct = _interval(probs, target)
    copies = _interval(probs.repeat_interleave(5, 0), target.repeat_interleave(5, 0))
    width = lambda scores: scores["iou_high"] - scores["iou_low"]  # noqa: E731
    assert width(copies) > 0.6 * width(distinct)  # not the 1/sqrt(5) = 0.45 of 300 independent images


def test_multiclass_intervals_are_of_the_macro_mean_over_present_classes():
    scores, target = _multiclass_data(7, n=30, absent=3)
    metrics = SegmentationMetrics(4, from_logits=True)
    metrics.update(scores, target, ids=[str(i) for i in range(30)])
    result = metrics.compute()
    assert result["iou_low"] <= result["iou"] <= result["iou_high"] and math.isnan(result["iou_3"])


def test_without_ids_there_is_no_interval_and_ids_must_match_the_images():
    probs, target = _frames(6, 4)
    assert "iou_low" not in _computed(SegmentationMetrics(1), probs, target)
    with pytest.raises(ValueError, match="an id for each of the 4 images"):
        SegmentationMetrics(1).update(probs, target, ids=["a"])
