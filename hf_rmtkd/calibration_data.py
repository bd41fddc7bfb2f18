"""Which examples calibrate: `RMTKDTrainer`'s default calibration subset of the training data."""

from __future__ import annotations

import itertools
import math

import torch


def is_iterable_only(dataset) -> bool:
    """A dataset without a length (`datasets.IterableDataset`, `torch.utils.data.IterableDataset`, a generator)."""
    return isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__")


def calibration_subset(dataset, args):
    """The default calibration set: a seeded `calibration_samples` (else `calibration_fraction`) of `dataset`.

    A dataset without a length gives its first `calibration_samples` examples (`calibration_fraction` needs a
    length: `ValueError` without `calibration_samples`).
    """
    if is_iterable_only(dataset):
        if args.calibration_samples is None:
            raise ValueError(
                f"The training dataset ({type(dataset).__name__}) has no length, so `calibration_fraction` cannot "
                "be applied: set `calibration_samples` or pass a `calibration_dataset`."
            )
        if hasattr(dataset, "take"):
            return dataset.take(args.calibration_samples)
        return list(itertools.islice(iter(dataset), args.calibration_samples))
    count = min(args.calibration_samples or math.ceil(args.calibration_fraction * len(dataset)), len(dataset))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))[:count]
    indices = sorted(order.tolist())
    return dataset.select(indices) if hasattr(dataset, "select") else torch.utils.data.Subset(dataset, indices)
