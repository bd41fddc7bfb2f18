"""Streaming activation statistics through forward hooks: float64 sums of x x^T, x and n per hooked module."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .activation_sums import ActivationStatistics, batch_sums, check_finite_sums, gram  # noqa: F401  (public here too)
from .sites import CONV_SITE_TYPES


# Values a dataset row holds where a batch holds tensors.
_ROW_TYPES = (list, tuple, str, int, float, np.ndarray)
_WHAT_TO_DO = (
    "A `datasets.Dataset` cannot be passed directly: wrap it in a DataLoader with a collator, e.g. "
    "`DataLoader(dataset.remove_columns(...), batch_size=16, collate_fn=DataCollatorWithPadding(tokenizer))`, or pass "
    "a list of dicts of batched tensors."
)


def check_batch(batch) -> None:
    """Refuse a calibration item that is not a batch (a dataset row, a list of tensors), saying what to do.

    A batch is a tensor, or a mapping of tensors for `model(**batch)` (`input_ids` of shape `(batch, seq)`,
    `pixel_values` of shape `(batch, channels, height, width)`); non-tensor options such as `None` or booleans pass.

    Raises:
        `TypeError` for lists, strings, numbers or arrays, or an unbatched `input_ids`/`pixel_values`.
    """
    if not isinstance(batch, Mapping):
        if isinstance(batch, _ROW_TYPES):
            raise TypeError(
                f"`calibration_data` yields a {type(batch).__name__}; each item must be a tensor (`model(batch)`) or "
                f"a dict of batched tensors (`model(**batch)`). {_WHAT_TO_DO}"
            )
        return
    for key, value in batch.items():
        if isinstance(value, _ROW_TYPES) and not isinstance(value, bool):
            raise TypeError(
                f"`calibration_data` yields single rows, not batches: {key!r} is a {type(value).__name__}, not a "
                f"batched tensor. {_WHAT_TO_DO}"
            )
    for key, dims in (("input_ids", 1), ("pixel_values", 3)):
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and value.dim() == dims:
            raise TypeError(
                f"`calibration_data` yields single rows, not batches: {key!r} has shape {tuple(value.shape)}, without "
                f"a batch axis. {_WHAT_TO_DO}"
            )


def flatten_samples(x: torch.Tensor, mask: torch.Tensor | None, conv: bool) -> torch.Tensor:
    """Flatten a module input to `(n, d)` samples, dropping padded positions."""
    if conv:
        # (batch, channels, height, width): every spatial position is one sample of the channel vector.
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(device=x.device, dtype=torch.bool)]
    return x.reshape(-1, x.shape[-1])


class StopForward(Exception):
    """Raised by a collector's hook to end a forward pass whose remaining layers feed no hooked module."""


class ActivationCollector:
    """Hooks the inputs of named modules (the outputs of those in `output_names`) and streams their statistics.

    Modules that receive the very same input tensor in a forward (Q, K and V, say) share one accumulation. When the
    first batch shows every hooked module running exactly once per forward, later forwards stop right after the last
    of them ([`StopForward`]): the layers after it, and a language model's head (a fifth of SmolLM2-135M's forward),
    never run, and a reduction of the first layers only costs the forward up to them.

    Args:
        model (`nn.Module`): the model to observe.
        module_names (`list[str]`): paths of the modules whose inputs are collected.
        max_samples (`int`, *optional*): cap on samples (tokens) per module; later samples are ignored.
        output_names (`list[str]`, *optional*): of `module_names`, those whose *outputs* are collected (an embedding
            table, whose input is token ids).
    """

    def __init__(
        self,
        model: nn.Module,
        module_names: list[str],
        max_samples: int | None = None,
        output_names: list[str] | None = None,
    ):
        if max_samples is not None and max_samples < 2:
            raise ValueError(f"`max_samples` must be >= 2 or None, got {max_samples}.")
        self.model = model
        self.max_samples = max_samples
        self.stats: dict[str, ActivationStatistics] = {}
        self.mask: torch.Tensor | None = None
        self._handles = []
        self._seen: dict[tuple[int, int], tuple] = {}
        self._calls: list[str] = []  # hooked calls of the current forward, in order
        self._stop_after: str | None = None  # set after the first batch, see the class docstring
        self._batches = 0
        self._names = list(dict.fromkeys(module_names))
        outputs = set(output_names or ())
        for name in self._names:
            module = model.get_submodule(name)
            hook = self._hook(name, isinstance(module, CONV_SITE_TYPES))
            if name in outputs:
                self._handles.append(
                    module.register_forward_hook(lambda module, args, output, h=hook: h(module, (output,)))
                )
            else:
                self._handles.append(module.register_forward_pre_hook(hook))

    def _hook(self, name: str, conv: bool):
        def hook(module, args):
            self._calls.append(name)
            self._collect(name, conv, args[0])
            if name == self._stop_after:
                raise StopForward

        return hook

    def _collect(self, name: str, conv: bool, x: torch.Tensor) -> None:
        stats = self.stats.get(name)
        taken = stats.count if stats is not None else 0
        if self.max_samples is not None and taken >= self.max_samples:
            return
        samples = flatten_samples(x, self.mask, conv)
        if self.max_samples is not None:
            samples = samples[: self.max_samples - taken]
        # Q, K and V see the very same tensor: its sums are computed once per batch. Keeping `x` alive in the
        # cache pins its id for the whole forward, so a freed tensor's id cannot be mistaken for it.
        key = (id(x), samples.shape[0])
        cached = self._seen.get(key)
        if cached is None:
            cached = (x, batch_sums(samples))
            # A NaN or Inf sample makes its column's float64 sum non-finite (finite float32 samples cannot overflow
            # it), so the d-vector of sums is checked instead of every sample.
            if not torch.isfinite(cached[1][1]).all():
                raise ValueError(
                    f"Non-finite (NaN or Inf) activations at the input of module {name!r}; "
                    "check the model's weights, the inputs and the dtype before calibrating."
                )
            check_finite_sums(name, *cached[1][:2])
            self._seen[key] = cached
        sums = cached[1]
        if stats is None:
            stats = self.stats[name] = ActivationStatistics.zeros(sums[1].numel())
        stats.merge(*sums)

    def end_batch(self) -> None:
        if self._batches == 0 and sorted(self._calls) == sorted(self._names):
            self._stop_after = self._calls[-1]
        self._batches += 1
        self._calls.clear()
        self._seen.clear()

    def full(self) -> bool:
        return (
            self.max_samples is not None
            and len(self.stats) == len(self._handles)
            and all(s.count >= self.max_samples for s in self.stats.values())
        )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()


def sum_across_processes(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum float64 tensors over all processes through accelerate's collective; returned as is without a process group.

    Every rank must call this with tensors of the same shapes, in the same order.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensors
    from accelerate import PartialState
    from accelerate.utils import DistributedType, reduce

    state = PartialState()
    if state.distributed_type == DistributedType.NO or state.num_processes != torch.distributed.get_world_size():
        # A process group accelerate does not drive: accelerate 1.15 under Trainer + torchrun on CPU reports
        # DistributedType.NO with 2 processes, and its `reduce` then silently returns the local tensor.
        def reduce(tensor, reduction):  # noqa: F811 - same contract as accelerate.utils.reduce(..., "sum")
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
            return tensor

    # SUM of contiguous float64 tensors: the portable collective on gloo and NCCL alike.
    return [reduce(t.contiguous(), reduction="sum") for t in tensors]


def reduce_across_processes(stats: dict[str, ActivationStatistics]) -> None:
    """Sum every module's statistics over all processes, in place (see [`sum_across_processes`]).

    Raw sums are reduced (never per-rank covariances), so uneven shards and centring stay exact. A no-op when no
    process group is initialised. Every rank must call this with the same module names.
    """
    for name in sorted(stats):
        s = stats[name]
        count = torch.tensor([float(s.count)], dtype=torch.float64)
        s.sum_outer, s.sum, count = sum_across_processes([s.sum_outer, s.sum, count])
        s.count = int(count.item())


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _fingerprint_update(digest, batch) -> None:
    tensors = batch.items() if isinstance(batch, Mapping) else [("", batch)]
    for key, value in sorted(tensors, key=lambda kv: kv[0]):
        if isinstance(value, torch.Tensor):
            digest.update(key.encode())
            digest.update(str(tuple(value.shape)).encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())


def _token_count(batch) -> int:
    """Tokens in a batch (attention-mask sum, else `input_ids` elements), or samples for a tensor batch."""
    if isinstance(batch, Mapping):
        for key in ("attention_mask", "input_ids", "pixel_values"):
            value = batch.get(key)
            if isinstance(value, torch.Tensor):
                return (
                    int(value.sum())
                    if key == "attention_mask"
                    else (value.numel() if key == "input_ids" else len(value))
                )
        return 1
    return len(batch) if isinstance(batch, torch.Tensor) else 1


def run_calibration(model: nn.Module, calibration_data: Iterable, collector, progress: bool | tqdm = True) -> str:
    """Run `model` over `calibration_data` without gradients, in eval mode, feeding a hook-based `collector`.

    `progress` is a flag (a bar for this pass) or a `tqdm` bar to advance by tokens (one bar for a whole reduction,
    see [`hf_rmtkd.pipeline`]).

    The collector's `mask` is set to each batch's `attention_mask` (or `None`) before the forward, `end_batch()` is
    called after it, the loop stops early when `full()` is true, and `remove()` is always called at the end.

    Returns:
        The sha256 hex digest of the calibration batches.

    Raises:
        `ValueError` if the data is empty; `TypeError` if it yields dataset rows rather than batches.
    """
    device = _model_device(model)
    digest = hashlib.sha256()
    was_training = model.training
    model.eval()
    is_main = (
        not (torch.distributed.is_available() and torch.distributed.is_initialized())
        or torch.distributed.get_rank() == 0
    )
    batches = 0
    shared = progress if isinstance(progress, tqdm) else None
    if shared is None:
        bar = tqdm(desc="calibration", unit="tok", disable=not (progress and is_main), leave=False)
    else:
        bar = shared
    try:
        with torch.no_grad():
            for batch in calibration_data:
                check_batch(batch)
                _fingerprint_update(digest, batch)
                if isinstance(batch, Mapping):
                    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    inputs.pop("labels", None)
                    inputs.pop("label", None)
                    collector.mask = inputs.get("attention_mask")
                    try:
                        model(**inputs)
                    except StopForward:
                        pass
                else:
                    collector.mask = None
                    try:
                        model(batch.to(device))
                    except StopForward:
                        pass
                collector.end_batch()
                batches += 1
                bar.update(_token_count(batch))
                if collector.full():
                    break
    finally:
        collector.remove()
        model.train(was_training)
        if shared is None:
            bar.close()
    if batches == 0:
        raise ValueError("`calibration_data` is empty: at least one batch is needed to estimate activation spectra.")
    return digest.hexdigest()


def collect_statistics(
    model: nn.Module,
    calibration_data: Iterable,
    module_names: list[str],
    max_samples: int | None = None,
    progress: bool = True,
    output_names: list[str] | None = None,
) -> tuple[dict[str, ActivationStatistics], str]:
    """Run `model` over `calibration_data` without gradients and collect input statistics of `module_names`.

    Args:
        model (`nn.Module`): any torch module; Hugging Face models get `model(**batch)`.
        calibration_data (`Iterable`): batches, each a dict of tensors (passed as `model(**batch)`; its
            `attention_mask`, of shape `(batch_size, seq_len)`, drops padded tokens) or a tensor (passed as
            `model(batch)`). Keys the model does not accept, such as `labels`, are dropped.
        module_names (`list[str]`): modules whose inputs are observed.
        max_samples (`int`, *optional*): cap on samples per module.
        progress (`bool` or `tqdm`, *optional*, defaults to `True`): show a tqdm bar (main process only), or advance
            this one.
        output_names (`list[str]`, *optional*): of `module_names`, those whose outputs are observed instead.

    Returns:
        `(statistics, fingerprint)`: statistics per module (summed over processes when distributed) and the sha256
        hex digest of the calibration batches.

    Raises:
        `ValueError` if the data is empty or activations are not finite.
    """
    collector = ActivationCollector(model, module_names, max_samples, output_names)
    fingerprint = run_calibration(model, calibration_data, collector, progress)
    reduce_across_processes(collector.stats)
    missing = [name for name in module_names if name not in collector.stats]
    if missing:
        raise ValueError(f"Modules {missing} never ran during calibration; they cannot be analysed.")
    return collector.stats, fingerprint
