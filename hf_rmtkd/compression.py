"""Post-training compression: analysis plus surgery in one call, returning an RMTKD model."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import torch
from torch import nn
from transformers import PreTrainedModel

from .analysis import SpectralOptions, SpectralReport, analyze_sites
from .configuration_rmtkd import RMTKDConfig
from .hidden import HIDDEN_KEY, reduce_hidden
from .modeling_rmtkd import RMTKDPreTrainedModel, wrapper_class_for
from .sites import select_sites
from .surgery import reduce_site


logger = logging.getLogger(__name__)


def merge_peft(model: nn.Module) -> nn.Module:
    """Merge a `peft.PeftModel` into its base model (with a message); any other model is returned unchanged."""
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but keep analysis usable without it
        return model
    if isinstance(model, PeftModel):
        logger.warning("Merging the PEFT adapters into the base model before RMT-KD reduction.")
        return model.merge_and_unload()
    return model


def to_rmtkd(model: PreTrainedModel | RMTKDPreTrainedModel) -> RMTKDPreTrainedModel:
    """Wrap a Hugging Face model in the RMTKD class of its task, sharing its modules (no copy).

    An RMTKD model is returned as is.
    """
    model = merge_peft(model)
    if isinstance(model, RMTKDPreTrainedModel):
        return model
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"compress() needs a transformers PreTrainedModel to write the RMTKD checkpoint format, got "
            f"{type(model).__name__}; for a plain nn.Module use hf_rmtkd.analyze and hf_rmtkd.surgery.reduce_site."
        )
    config = RMTKDConfig(
        base_config=model.config.to_dict(),
        base_architecture=type(model).__name__,
        reduced_modules={},
        id2label=getattr(model.config, "id2label", None),
        label2id=getattr(model.config, "label2id", None),
    )
    return wrap_existing(wrapper_class_for(model), config, model).to(model.device)


def wrap_existing(
    cls: type[RMTKDPreTrainedModel], config: RMTKDConfig, model: PreTrainedModel
) -> RMTKDPreTrainedModel:
    """`cls(config, model=model)` without re-initialising any of `model`'s (trained or reduced) modules."""
    # The wrapper's post_init initialises every module not flagged as initialised; these all hold real weights.
    for module in model.modules():
        module._is_hf_initialized = True
    return cls(config, model=model)


def apply_report(
    model: RMTKDPreTrainedModel, report: SpectralReport, ffn_method: str = "select", names: Iterable[str] | None = None
) -> dict[str, dict]:
    """Reduce the sites of `report` (or only `names`) in `model` and record them in its config.

    Returns:
        The new config records, keyed by module path.
    """
    options = report.options
    records = {}
    spectra = model.__dict__.setdefault("rmtkd_spectra", {})
    for name in names or list(report):
        # Keep what the card's plots need, not the (d, d) eigenvectors and sums.
        spectra[name] = dataclasses.replace(report[name], eigenvectors=torch.empty(0), statistics=None)
        record = reduce_site(model.model, report[name], options.centered, ffn_method)
        if record is None:
            continue
        previous = model.config.reduced_modules.get(name)
        if previous is not None:
            # A second reduction of the same site: shapes stay relative to the original module.
            record["in_features"], record["out_features"] = previous["in_features"], previous["out_features"]
        record.update(estimator=options.estimator, tau=options.tau, false_alarm=options.false_alarm)
        records[name] = record
    model.config.reduced_modules.update(records)
    model.config.calibration = {
        "fingerprint": report.fingerprint,
        "n_tokens": max((site.n_samples for site in report.values()), default=0),
        "estimator": options.estimator,
        "tau": options.tau,
        "false_alarm": options.false_alarm,
        "centered": options.centered,
        "max_samples": options.max_samples,
        "rank_multiple": options.rank_multiple,
        "seed": options.seed,
    }
    return records


def compress(
    model: PreTrainedModel | RMTKDPreTrainedModel,
    calibration_data: Iterable,
    target_modules: str | list[str] | None = None,
    ffn_method: str = "select",
    progress: bool = True,
    return_report: bool = False,
    hidden_width: bool = False,
    **options,
) -> RMTKDPreTrainedModel | tuple[RMTKDPreTrainedModel, SpectralReport]:
    """Compress a trained model with the MP rule, without fine-tuning (post-training compression).

    Args:
        model (`PreTrainedModel`): the model to compress; it is reduced in place and wrapped (a `PeftModel` is
            merged first).
        calibration_data (`Iterable`): batches as for [`analyze`].
        target_modules (`str` or `list[str]`, *optional*): sites to reduce, as in [`analyze`]; default every site.
        ffn_method (`str`, *optional*, defaults to `"select"`): FFN surgery, `"select"` or `"project"` (the paper's
            fold); see [`hf_rmtkd.surgery`].
        progress (`bool`, *optional*, defaults to `True`): progress bar.
        return_report (`bool`, *optional*, defaults to `False`): also return the [`SpectralReport`].
        hidden_width (`bool`, *optional*, defaults to `False`): first reduce the width of the residual stream (one
            projection for the whole model: exact for Llama-family and GPT-2 decoders, approximated and fitted on the data for
            post-LN BERT, RoBERTa and MPNet encoders; see [`hf_rmtkd.hidden`]), then the other sites
            (`target_modules=[]` for none). `calibration_data` is then iterated several times (a one-shot iterator
            is materialised into a list).
        **options: fields of [`SpectralOptions`].

    Returns:
        An `RMTKDFor<Task>` model whose `config.reduced_modules` records every reduction; `save_pretrained` writes it
        and `AutoModelFor<Task>.from_pretrained` reloads it after `import hf_rmtkd`.
    """
    wrapper = to_rmtkd(model)
    spectral = SpectralOptions(**options)
    if hidden_width and iter(calibration_data) is calibration_data:
        calibration_data = list(calibration_data)  # iterated more than once below
    hidden = reduce_hidden(wrapper, calibration_data, spectral, progress) if hidden_width else None
    sites = select_sites(wrapper.model, target_modules)
    report = SpectralReport({}, spectral, "")
    if sites:
        report = analyze_sites(wrapper.model, calibration_data, sites, spectral, progress)
        apply_report(wrapper, report, ffn_method)
    if hidden is not None:
        report = SpectralReport({HIDDEN_KEY: hidden, **report}, spectral, report.fingerprint)
    return (wrapper, report) if return_report else wrapper
