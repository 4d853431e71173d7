"""Epoch-level segmentation metrics from accumulated confusion counts, DDP-aware.

``update()`` only adds integer counts (a confusion matrix, and for binary road a histogram of road
probabilities over the KITTI thresholds); ``compute()`` sums the counts over all DDP ranks first
(when torch.distributed is initialised; every rank must then call it) and only then derives
scores, so no score is ever averaged over batches or workers.

Conventions (as scikit-learn with zero_division=0):
  * A ratio whose denominator is 0 is 0: no predicted positives -> precision 0, no true positives
    -> recall 0, f1 = 2TP / (2TP + FP + FN), iou = TP / (TP + FP + FN), no labelled pixel -> accuracy 0.
  * Multi-class: a class that is absent (no true and no predicted pixel) has NaN for its per-class
    scores and is left out of the macro means, as sklearn's average="macro" only averages labels
    present in y_true or y_pred. No class present at all -> macro means 0.
  * Binary: scores of the road (positive) class, as sklearn's average="binary". Road is predicted
    where the probability is > 0.5. ``maxf``/``ap`` follow the KITTI road devkit
    (evalExp + pxEval_maximizeFMeasure): at each threshold t = i/255 (i = 0..255) a pixel is road
    iff its probability >= t (compared in float64); MaxF is the best F1 over the thresholds
    (precision = TP / (TP + FP + 1e-10), thresholds with TP = 0 skipped), AP the 11-point
    interpolated Pascal VOC precision. Without any road pixel in the ground truth both are 0.
Per group (``groups``: the names of a dataset sharded with --group-by): ``iou@<group>`` and
``f1@<group>`` from that group's own pooled confusion counts, as the pooled scores are from all of
them (a group with no labelled pixel scores 0, as above); ``iou@worst`` and ``f1@worst``, the lowest
of them (each its own minimum: the two may be of different groups).
Intervals (``ids``: each image's sample id): ``iou_low``/``iou_high`` and ``f1_low``/``f1_high``, a
95% percentile bootstrap of the pooled score from each image's own confusion counts. Frames next to
each other are near-duplicates, so what is resampled is blocks of consecutive frames (the ids in
sorted order), a moving-block bootstrap of block length round(n ** (1/3)) for n images
(BOOTSTRAP_RESAMPLES resamples, a fixed seed: the same counts give the same interval).
Keys carry no prefix; the training loop adds ``train_``/``val_``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

from raytrain.config import WORST_GROUP

ROAD_THRESHOLD = 0.5  # road where its probability is above this
BOOTSTRAP_RESAMPLES = 1000
INTERVAL = (0.025, 0.975)  # the quantiles of a 95% interval
KITTI_THRESHOLDS = torch.arange(256, dtype=torch.float64) / 255.0
_HISTOGRAM_BINS = len(KITTI_THRESHOLDS) + 1  # bin b: probability in [t_(b-1), t_b), with t_-1 = -inf, t_256 = inf


def to_labels(probabilities):
    """The class index per pixel (uint8, H x W) of (C, H, W) probabilities, numpy or torch: with one
    channel, road where its probability is above ROAD_THRESHOLD; else the most probable class. The
    metrics, predict's masks and the overlays all count the same pixels this way."""
    labels = probabilities[0] > ROAD_THRESHOLD if len(probabilities) == 1 else probabilities.argmax(0)
    return labels.astype(np.uint8) if isinstance(labels, np.ndarray) else labels.to(torch.uint8)


class SegmentationMetrics:
    """Accumulates per-pixel counts over an epoch; ``compute()`` -> dict of floats.

    scores: (N, C, H, W) probabilities (logits if ``from_logits``); C == 1 is binary road.
    target: (N, H, W) class indices (0/1 for binary), ``ignore_index`` where unlabelled.
    groups: with group names given, (N,) each image's index into them.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
        from_logits: bool = False,
        groups: Sequence[str] = (),
    ):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.binary = num_classes == 1
        self.ignore_index = ignore_index
        self.from_logits = from_logits
        default_names = ["road"] if self.binary else [str(c) for c in range(num_classes)]
        self.class_names = list(class_names) if class_names is not None else default_names
        if len(self.class_names) != num_classes:
            raise ValueError(f"{num_classes} class(es) but class_names={self.class_names}")
        self.groups = list(groups)
        if WORST_GROUP in self.groups:
            raise ValueError(f"a group may not be named {WORST_GROUP!r}: iou@{WORST_GROUP} is the lowest group's score")
        self._confusion_size = 2 if self.binary else num_classes
        self.reset()

    def reset(self) -> None:
        self.confusion: torch.Tensor | None = None  # [true class, predicted class]
        self.histogram: torch.Tensor | None = None  # [true road?, KITTI threshold bin] (binary only)
        self.group_confusion: torch.Tensor | None = None  # [group, true class, predicted class]
        self.image_ids: list[str] = []
        self.image_confusion: list[torch.Tensor] = []  # (N, k, k) a batch, for the intervals

    def _zero_counts(self, device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        k = self._confusion_size
        return (
            torch.zeros(k, k, dtype=torch.int64, device=device),
            torch.zeros(2, _HISTOGRAM_BINS, dtype=torch.int64, device=device) if self.binary else None,
            torch.zeros(len(self.groups), k, k, dtype=torch.int64, device=device) if self.groups else None,
        )

    @torch.no_grad()
    def update(self, scores: torch.Tensor, target: torch.Tensor, groups: torch.Tensor | None = None,
               ids: Sequence[str] | None = None) -> None:
        if scores.dim() != 4 or scores.size(1) != self.num_classes or target.shape != scores.shape[:1] + scores.shape[2:]:
            raise ValueError(
                f"expected scores (N, {self.num_classes}, H, W) and target (N, H, W), "
                f"got {tuple(scores.shape)} and {tuple(target.shape)}"
            )
        if bool(self.groups) != (groups is not None):
            raise ValueError(f"groups of each image are needed exactly when group names are given ({self.groups})")
        if ids is not None and len(ids) != len(target):
            raise ValueError(f"expected an id for each of the {len(target)} images, got {len(ids)}")
        if self.confusion is None:
            self.confusion, self.histogram, self.group_confusion = self._zero_counts(scores.device)

        target = target.to(scores.device).long()
        valid = target != self.ignore_index
        truth = target[valid]
        if self.binary:
            probability = scores[:, 0].float()
            if self.from_logits:
                probability = probability.sigmoid()
            probability = probability[valid]
            predicted = (probability > ROAD_THRESHOLD).long()
            # number of thresholds <= p: road at threshold i iff bin > i (KITTI's p >= t_i, in float64)
            bins = torch.bucketize(probability.double(), KITTI_THRESHOLDS.to(scores.device), right=True)
            self.histogram += self._bincount(truth * _HISTOGRAM_BINS + bins, 2 * _HISTOGRAM_BINS).view(2, -1)
        else:
            predicted = scores.argmax(dim=1)[valid]  # argmax of logits == argmax of softmax
        k, count = self._confusion_size, len(valid)
        if truth.numel() and (truth.min() < 0 or truth.max() >= k):
            raise ValueError("target holds a class index outside [0, num_classes) that is not ignore_index")
        # Each image's confusion counts, in one bincount: the pooled and the per-group counts are their sums.
        image = torch.arange(count, device=valid.device).view(-1, *[1] * (valid.dim() - 1)).expand_as(valid)[valid]
        per_image = torch.bincount(image * k * k + truth * k + predicted, minlength=count * k * k).view(count, k, k)
        self.confusion += per_image.sum(0)
        if groups is not None:
            self._update_groups(groups.to(scores.device).long(), per_image)
        if ids is not None:
            self.image_confusion.append(per_image)  # on the device: moved once, in compute()
            self.image_ids += list(ids)

    def _update_groups(self, groups: torch.Tensor, per_image: torch.Tensor) -> None:
        """Add each image's confusion counts to those of its group."""
        count = len(self.groups)
        if groups.shape != per_image.shape[:1] or (groups.numel() and (groups.min() < 0 or groups.max() >= count)):
            raise ValueError(f"expected groups (N,) of indices into {count} group names, got {groups.tolist()}")
        self.group_confusion.index_add_(0, groups, per_image)

    @staticmethod
    def _bincount(index: torch.Tensor, size: int) -> torch.Tensor:
        counts = torch.bincount(index, minlength=size)
        if len(counts) > size or (index.numel() and index.min() < 0):
            raise ValueError("target holds a class index outside [0, num_classes) that is not ignore_index")
        return counts

    def compute(self) -> dict[str, float]:
        confusion, histogram, group_confusion = (
            None if counts is None else counts.cpu() for counts in self._summed_counts()
        )
        scores = self._scores(confusion.double())
        if self.binary:
            scores.update(_kitti_maxf_ap(histogram))
        for name, counts in zip(self.groups, group_confusion if group_confusion is not None else []):
            of_group = self._scores(counts.double())
            scores[f"iou@{name}"], scores[f"f1@{name}"] = of_group["iou"], of_group["f1"]
        if self.groups:
            for score in ("iou", "f1"):
                scores[f"{score}@{WORST_GROUP}"] = min(scores[f"{score}@{name}"] for name in self.groups)
        ids, images = self._gathered_images()
        if ids:
            scores.update(self._intervals(images[np.argsort(ids, kind="stable")]))
        return scores

    def _gathered_images(self) -> tuple[list[str], np.ndarray]:
        """Every rank's image ids and (N, k, k) confusion counts: resampling needs them in one place
        (a few integers an image)."""
        k = self._confusion_size
        own = (self.image_ids, torch.cat(self.image_confusion).cpu().numpy() if self.image_confusion else np.zeros((0, k, k), np.int64))
        parts = [own]
        if dist.is_available() and dist.is_initialized():
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, own)
        return [i for ids, _ in parts for i in ids], np.concatenate([counts for _, counts in parts])

    def _intervals(self, images: np.ndarray) -> dict[str, float]:
        """The 95% moving-block bootstrap intervals of the pooled IoU and F1 (module docstring)."""
        count, k = len(images), self._confusion_size
        block = max(1, min(count, round(count ** (1 / 3))))
        generator = np.random.default_rng(0)
        starts = generator.integers(0, count - block + 1, size=(BOOTSTRAP_RESAMPLES, -(-count // block)))
        # each image's weight in a resample: how many of its drawn blocks cover it
        cover = np.zeros((BOOTSTRAP_RESAMPLES, count + 1), np.int64)
        rows = np.arange(BOOTSTRAP_RESAMPLES)[:, None]
        np.add.at(cover, (rows, starts), 1)
        np.add.at(cover, (rows, starts + block), -1)
        weights = cover.cumsum(1)[:, :count].astype(np.float64)
        confusion = (weights @ images.reshape(count, k * k).astype(np.float64)).reshape(-1, k, k)
        if self.binary:
            tp, fp, fn = confusion[:, 1, 1], confusion[:, 0, 1], confusion[:, 1, 0]
            iou, f1 = _safe_ratio(tp, tp + fp + fn), _safe_ratio(2 * tp, 2 * tp + fp + fn)
        else:
            tp, true, predicted = confusion.diagonal(0, 1, 2), confusion.sum(2), confusion.sum(1)
            present = (true + predicted) > 0
            mean = lambda values: np.where(present.any(1), (values * present).sum(1) / np.maximum(present.sum(1), 1), 0.0)  # noqa: E731
            iou, f1 = mean(_safe_ratio(tp, true + predicted - tp)), mean(_safe_ratio(2 * tp, true + predicted))
        (iou_low, iou_high), (f1_low, f1_high) = np.quantile(iou, INTERVAL), np.quantile(f1, INTERVAL)
        return {"iou_low": float(iou_low), "iou_high": float(iou_high), "f1_low": float(f1_low), "f1_high": float(f1_high)}

    def _summed_counts(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(confusion, histogram, group confusion) summed over all ranks (copies: compute() may be called
        more than once)."""
        if self.confusion is None:  # nothing seen on this rank; still take part in the all_reduce
            device = "cpu"
            if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            counts = self._zero_counts(device)
        else:
            counts = tuple(None if c is None else c.clone() for c in (self.confusion, self.histogram, self.group_confusion))
        if dist.is_available() and dist.is_initialized():
            for tensor in counts:
                if tensor is not None:
                    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return counts

    def _scores(self, confusion: torch.Tensor) -> dict[str, float]:
        return self._binary_scores(confusion) if self.binary else self._multiclass_scores(confusion)

    def _binary_scores(self, confusion: torch.Tensor) -> dict[str, float]:
        tp, fp, fn = confusion[1, 1], confusion[0, 1], confusion[1, 0]
        iou = _ratio(tp, tp + fp + fn)
        return {
            "accuracy": _ratio(confusion.trace(), confusion.sum()),
            "precision": _ratio(tp, tp + fp),
            "recall": _ratio(tp, tp + fn),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "iou": iou,
            f"iou_{self.class_names[0]}": iou,
        }

    def _multiclass_scores(self, confusion: torch.Tensor) -> dict[str, float]:
        tp = confusion.diagonal()
        true, predicted = confusion.sum(1), confusion.sum(0)
        present = (true + predicted) > 0
        per_class = {
            "precision": _ratios(tp, predicted),
            "recall": _ratios(tp, true),
            "f1": _ratios(2 * tp, true + predicted),
            "iou": _ratios(tp, true + predicted - tp),
        }
        scores = {"accuracy": _ratio(tp.sum(), confusion.sum())}
        for metric, values in per_class.items():
            scores[metric] = values[present].mean().item() if present.any() else 0.0
            for name, value, is_present in zip(self.class_names, values.tolist(), present.tolist()):
                scores[f"{metric}_{name}"] = value if is_present else float("nan")
        return scores


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> float:
    return (numerator / denominator).item() if denominator > 0 else 0.0


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.where(denominator > 0, numerator / np.maximum(denominator, 1), 0.0)


def _ratios(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1), 0.0)


def kitti_precision_recall(histogram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(recall, precision, threshold) at each KITTI threshold that finds some road, from the
    [negative, positive] x bin histograms, counted as KITTI's pxEval_maximizeFMeasure does."""
    negative, positive = histogram.double()
    # road at threshold i iff bin > i  ->  TP_i / FP_i = counts in bins i+1 .. 256
    tp = positive.flip(0).cumsum(0).flip(0)[1:]
    fp = negative.flip(0).cumsum(0).flip(0)[1:]
    recall = tp / positive.sum().clamp_min(1)
    precision = tp / (tp + fp + 1e-10)
    found = tp > 0  # recall and precision are both 0 exactly where nothing is found
    return recall[found], precision[found], KITTI_THRESHOLDS[found]


def _kitti_maxf_ap(histogram: torch.Tensor) -> dict[str, float]:
    """MaxF and AP from histograms [negative, positive] x bin, as KITTI's pxEval_maximizeFMeasure."""
    if histogram[1].sum() == 0:
        return {"maxf": 0.0, "ap": 0.0}
    recall, precision, _ = kitti_precision_recall(histogram)
    f_measure = 2 * precision * recall / (precision + recall + 1e-10)
    # Pascal VOC 11-point AP; levels i * 0.1 exactly as np.arange(0, 1.1, 0.1) gives them
    levels = [i * 0.1 for i in range(11)]
    ap = sum(precision[recall >= level].max().item() for level in levels) / len(levels)
    return {"maxf": f_measure.max().item(), "ap": ap}
