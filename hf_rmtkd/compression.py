"""Post-training compression: analysis plus surgery in one call, returning an RMTKD model."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable

from torch import nn
from transformers import PreTrainedModel

from .analysis import SpectralOptions, SpectralReport
from .configuration_rmtkd import RMTKDConfig
from .modeling_rmtkd import RMTKDPreTrainedModel, wrapper_class_for
from .pipeline import ReductionPlan, reduce_model
from .processing import find_processing_class
from .sites import linear_shape, select_sites
from .surgery import FACTORISED_MODULES


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


class _Wrapped:
    """Left in the inner model's `__dict__` (not a submodule, never saved) by `to_rmtkd`: its wrapper, weakly, and
    the wrapper's config. A model object handed to `compress` is reduced in place; this lets a second `compress` of
    that object (a re-run notebook cell) continue from the first one's records instead of writing a checkpoint that
    cannot load. Copies and pickles keep the config only (a weak reference can be neither).
    """

    __slots__ = ("config", "wrapper")

    def __init__(self, wrapper: RMTKDPreTrainedModel | None, config: RMTKDConfig):
        self.wrapper = weakref.ref(wrapper) if wrapper is not None else (lambda: None)
        self.config = config

    def __reduce__(self):
        return _Wrapped, (None, self.config)


_MARK = "_rmtkd_wrapped"


def _mark(model: PreTrainedModel, wrapper: RMTKDPreTrainedModel) -> None:
    model.__dict__[_MARK] = _Wrapped(wrapper, wrapper.config)


def _records_describe(model: nn.Module, config: RMTKDConfig) -> bool:
    """Whether `model`'s modules have the reduced shapes `config`'s records say (so the records can be continued)."""
    if config.hidden_width is not None and getattr(model.config, "hidden_size", None) != config.hidden_width.rank:
        return False
    for path, record in config.reduced_modules.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            return False
        factorised = FACTORISED_MODULES.get(record.kind)
        if factorised is not None:
            merged = getattr(record, "merged", False)
            if not merged and (not isinstance(module, factorised) or module.rank != record.rank):
                return False
        elif linear_shape(module)[0] != record.rank:
            return False
    return True


def _existing_wrapper(model: PreTrainedModel) -> RMTKDPreTrainedModel | None:
    """The RMTKD wrapper `model` was reduced under, or a new one over the same records; `None` if never wrapped.

    Raises:
        `ValueError` if `model` was wrapped but its wrapper's records no longer describe it.
    """
    mark = model.__dict__.get(_MARK)
    if mark is None:
        return None
    wrapper, config = mark.wrapper(), mark.config
    if wrapper is not None and wrapper.model is model:
        return wrapper
    if not _records_describe(model, config):
        raise ValueError(
            f"This {type(model).__name__} was handed to hf_rmtkd (compress, to_rmtkd or RMTKDTrainer) and the RMTKD "
            "model made from it has since been rebuilt, so its records no longer describe this object. Pass the RMTKD "
            "model that call returned (or `trainer.model`) instead of the original object."
        )
    # The wrapper is gone (a re-run cell dropped it) but the records still describe the modules: continue from them.
    wrapper = wrap_existing(wrapper_class_for(model), config, model)
    _mark(model, wrapper)
    return wrapper


def _wrap(model: PreTrainedModel | RMTKDPreTrainedModel) -> tuple[RMTKDPreTrainedModel, bool]:
    """`to_rmtkd`, and whether the wrapper is new (nothing wrapped `model` before)."""
    model = merge_peft(model)
    if isinstance(model, RMTKDPreTrainedModel):
        return model, False
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"compress() needs a transformers PreTrainedModel to write the RMTKD checkpoint format, got "
            f"{type(model).__name__}; for a plain nn.Module use hf_rmtkd.analyze and hf_rmtkd.surgery.reduce_site."
        )
    existing = _existing_wrapper(model)
    if existing is not None:
        return existing, False
    config = RMTKDConfig(
        base_config=model.config.to_dict(),
        base_architecture=type(model).__name__,
        reduced_modules={},
        id2label=getattr(model.config, "id2label", None),
        label2id=getattr(model.config, "label2id", None),
    )
    wrapper = wrap_existing(wrapper_class_for(model), config, model).to(model.device)
    _mark(model, wrapper)
    return wrapper, True


def to_rmtkd(model: PreTrainedModel | RMTKDPreTrainedModel) -> RMTKDPreTrainedModel:
    """Wrap a Hugging Face model in the RMTKD class of its task, sharing its modules (no copy).

    An RMTKD model is returned as is. A model wrapped before (an earlier `compress` reduced it in place) gets the
    wrapper whose records describe its reductions, so they are continued, never forgotten.

    Raises:
        `TypeError` for a model that is not a `PreTrainedModel`; `ValueError` for a model whose RMTKD wrapper has
        since rebuilt its modules (pass that wrapper instead).
    """
    return _wrap(model)[0]


def wrap_existing(
    cls: type[RMTKDPreTrainedModel], config: RMTKDConfig, model: PreTrainedModel
) -> RMTKDPreTrainedModel:
    """`cls(config, model=model)` without re-initialising any of `model`'s (trained or reduced) modules."""
    # The wrapper's post_init initialises every module not flagged as initialised; these all hold real weights.
    for module in model.modules():
        module._is_hf_initialized = True
    return cls(config, model=model)


def compress(
    model: PreTrainedModel | RMTKDPreTrainedModel,
    calibration_data: Iterable,
    target_modules: str | list[str] | None = None,
    ffn_method: str = "select",
    progress: bool = True,
    return_report: bool = False,
    hidden_width: bool = False,
    processing_class=None,
    embeddings: bool = False,
    convolutions: str = "channels",
    **options,
) -> RMTKDPreTrainedModel | tuple[RMTKDPreTrainedModel, SpectralReport]:
    """Compress a trained model with the MP rule, without fine-tuning (post-training compression).

    Args:
        model (`PreTrainedModel`): the model to compress; it is reduced in place and wrapped (a `PeftModel` is
            merged first). Compressing the same object again (or the returned RMTKD model) continues from the
            first call's records: the result holds both rounds and saves and loads. A `SentenceTransformer` (or
            the folder of one) is handed to [`compress_sentence_transformer`]: its transformer is reduced, the other
            modules kept, and the `SentenceTransformer` returned.
        calibration_data (`Iterable`): batches as for [`analyze`] (a `datasets.Dataset` of rows is refused: wrap it
            in a `DataLoader` with a collator); raw sentences for a `SentenceTransformer`.
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
        embeddings (`bool`, *optional*, defaults to `False`): also factorise the input token table (with
            `target_modules=None`): a `(V, k)` table and a `k -> d` map, `k` by the MP rule on the table's output
            covariance over the calibration tokens ([`~hf_rmtkd.layers.LowRankEmbedding`]). On a small encoder the
            table is most of the model (52% of MiniLM, 76% once its width is reduced). Refused for a table tied to
            the output head.
        convolutions (`str`, *optional*, defaults to `"channels"`): how a CNN's block convolutions are reduced:
            `"channels"` keeps `k` of each block's inner channels (the paper's CNN site), `"factorize"` factorises
            every block convolution as a `k x k` convolution to `k` channels and a `1 x 1` one back, `k` by the MP
            rule on the convolution's output covariance ([`~hf_rmtkd.layers.LowRankConv2d`]).
        processing_class (*optional*): tokenizer or processor that `save_pretrained` of the result writes beside the
            weights (so `pipeline(task, model=folder)` works). By default the one saved in the folder the model was
            loaded from, if any.
        **options: fields of [`SpectralOptions`].

    Returns:
        An `RMTKDFor<Task>` model whose `config.reduced_modules` records every reduction; `save_pretrained` writes it
        and `AutoModelFor<Task>.from_pretrained` reloads it after `import hf_rmtkd`.

    Raises:
        `ValueError` / `TypeError` naming the argument, module or site at fault. Nothing is reduced then: the model
        is left as it was.
    """
    from .sentence_models import compress_sentence_transformer, is_sentence_transformer  # imports this module

    if is_sentence_transformer(model):
        return compress_sentence_transformer(
            model, calibration_data, progress=progress, target_modules=target_modules, ffn_method=ffn_method,
            return_report=return_report, hidden_width=hidden_width, embeddings=embeddings, **options,
        )  # fmt: skip
    spectral = SpectralOptions(**options)
    plan = ReductionPlan(
        target_modules=target_modules,
        hidden_steps_left=int(hidden_width),
        ffn_method=ffn_method,
        embeddings=embeddings,
        convolutions=convolutions,
    )
    wrapper, created = _wrap(model)
    inner = wrapper.model
    try:
        select_sites(inner, target_modules, plan.kinds)  # names that match nothing raise before any work
        result = reduce_model(wrapper, calibration_data, spectral, plan, progress)
    except BaseException:
        if created:
            inner.__dict__.pop(_MARK, None)
        raise
    if wrapper.model is not inner:
        # Rebuilt for the hidden width: the object passed in was not reduced, and the records describe the new one.
        inner.__dict__.pop(_MARK, None)
        _mark(wrapper.model, wrapper)
    if processing_class is not None:
        wrapper.processing_class = processing_class
    elif wrapper.processing_class is None:
        wrapper.processing_class = find_processing_class(wrapper) or find_processing_class(inner)
    return (wrapper, result.report) if return_report else wrapper
