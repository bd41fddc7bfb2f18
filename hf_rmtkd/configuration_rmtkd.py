"""`RMTKDConfig`: the base model's config plus the retained rank and provenance of every reduced module."""

from __future__ import annotations

import copy
from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .records import FORMAT_VERSION, HIDDEN_SITE, HiddenRecord, ModuleRecord, upgrade_records


_MISSING = object()
# Attributes that pipelines and generation read from `model.config`; the base config's values are served.
_FORWARDED_ATTRIBUTES = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "decoder_start_token_id",
    "is_decoder",
    "image_size",
    "num_channels",
    "hidden_act",
    "use_cache",
    "sep_token_id",
)


class RMTKDConfig(PreTrainedConfig):
    r"""
    Configuration of an RMT-KD compressed model: everything needed to rebuild its reduced shapes before weights load.

    Args:
        base_config (`dict`):
            `to_dict()` of the uncompressed model's config (it carries its `model_type`).
        base_architecture (`str`):
            Class name of the uncompressed model, e.g. `"BertForSequenceClassification"`.
        reduced_modules (`dict[str, FFNRecord | LinearRecord | EmbeddingRecord | ConvRecord]`, *optional*):
            One typed record per reduced module, keyed by module path inside the base model (see
            [`hf_rmtkd.records`]: `FFNRecord` for the inner width of a feed-forward block, `LinearRecord` for a
            low-rank factorisation, `EmbeddingRecord` for a factorised input token table, `ConvRecord` for a
            factorised convolution; each with its shape,
            `rank` and the MP provenance). Dicts (as in `config.json`)
            are converted on construction.
        hidden_width ([`~hf_rmtkd.records.HiddenRecord`], *optional*):
            The residual-stream width reduction, if any: `dim -> rank` and the base-config overrides that rebuild it.
        format_version (`int`, *optional*):
            Version of the record format; checkpoints of hf_rmtkd 0.1.0 (none recorded, version 1) are converted on
            read, and a version newer than this library's is refused.
        calibration (`dict`, *optional*):
            Provenance of the calibration: token count, fingerprint (sha256 of the calibration batches), seed,
            estimator, `tau`, false-alarm level and whether the covariance was centred.
        weights_sha256 (`str`, *optional*):
            sha256 of the saved weights (every tensor of the safetensors files: name, dtype, shape, bytes, in sorted
            key order), written by `save_pretrained` and checked by `from_pretrained`; `None` in older checkpoints,
            which load unchecked.

    Example:

    ```python
    >>> import hf_rmtkd  # registers RMTKDConfig and the RMTKD model classes with the Auto classes
    >>> from transformers import AutoModelForSequenceClassification
    >>> model = AutoModelForSequenceClassification.from_pretrained("path/to/compressed")
    ```
    """

    model_type = "rmtkd"

    base_config: dict | None = None
    base_architecture: str | None = None
    reduced_modules: dict | None = None
    hidden_width: dict | HiddenRecord | None = None
    calibration: dict | None = None
    weights_sha256: str | None = None
    format_version: int | None = None

    def __post_init__(self, **kwargs):
        self.reduced_modules, self.hidden_width = upgrade_records(
            self.reduced_modules, self.hidden_width, self.format_version
        )
        self.format_version = FORMAT_VERSION
        self.calibration = dict(self.calibration or {})
        base = self.base_config or {}
        # Pipelines read labels from the top-level config; default them from the base model's.
        if kwargs.get("id2label") is None and self.id2label is None and base.get("id2label"):
            self.id2label = {int(k): v for k, v in base["id2label"].items()}
            self.label2id = dict(base.get("label2id") or {v: k for k, v in self.id2label.items()})
        super().__post_init__(**kwargs)

    def record_calibration(self, fingerprint: str, n_tokens: int, options: dict) -> None:
        """Record the calibration behind the last reduction: data fingerprint (sha256), token count, and the spectral
        options as their own dict (`dataclasses.asdict(SpectralOptions)`)."""
        self.calibration = {"fingerprint": fingerprint, "n_tokens": int(n_tokens), **options}

    def validate_records(self) -> None:
        """Check every record (after a hand edit of the fields); raises `ValueError` naming the record, the field
        and the value."""
        for path, record in self.reduced_modules.items():
            if not isinstance(record, ModuleRecord):
                raise ValueError(
                    f"`reduced_modules[{path!r}]` must be a module record (FFN, linear, embedding or conv), got {record!r}."
                )
            record.validate(f"reduced_modules[{path!r}]")
        if self.hidden_width is not None:
            self.hidden_width.validate("hidden_width")

    def ranks(self) -> dict[str, int]:
        """Retained rank of every reduction: `{"hidden_size": k}` first if the width was reduced, then by path."""
        ranks = {HIDDEN_SITE: self.hidden_width.rank} if self.hidden_width is not None else {}
        return {**ranks, **{path: record.rank for path, record in self.reduced_modules.items()}}

    def to_dict(self) -> dict[str, Any]:
        """As `PreTrainedConfig.to_dict`, with the records as plain dicts (what `config.json` holds)."""
        output = super().to_dict()
        output["reduced_modules"] = {path: record.to_dict() for path, record in self.reduced_modules.items()}
        output["hidden_width"] = self.hidden_width.to_dict() if self.hidden_width is not None else None
        return output

    def get_base_config(self) -> PreTrainedConfig:
        """The uncompressed model's config, rebuilt through `AutoConfig.for_model`."""
        if not self.base_config:
            raise ValueError("`RMTKDConfig.base_config` is empty: this config does not describe a model.")
        if not isinstance(self.base_config, dict):
            raise ValueError(
                f"`RMTKDConfig.base_config` must be a dict (the base model's `config.to_dict()`), got "
                f"{type(self.base_config).__name__}: config.json was edited or written by hand."
            )
        values = copy.deepcopy(self.base_config)
        model_type = values.pop("model_type", None)
        if model_type is None:
            raise ValueError("`RMTKDConfig.base_config` has no `model_type`.")
        for key in ("transformers_version", "architectures", "_name_or_path"):
            values.pop(key, None)
        values["architectures"] = [self.base_architecture] if self.base_architecture else None
        values.update(self.config_overrides())
        return AutoConfig.for_model(model_type, **values)

    def config_overrides(self) -> dict:
        """Base-config values changed by a reduction (the hidden width sets `hidden_size` and friends)."""
        hidden = self.__dict__.get("hidden_width")
        return dict(hidden.config_overrides) if isinstance(hidden, HiddenRecord) else {}

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: serve the base config's values of the common attributes.
        if name in _FORWARDED_ATTRIBUTES:
            base = self.__dict__.get("base_config") or {}
            overrides = self.config_overrides()
            # GPT-2 and others store `hidden_size` as `n_embd`: follow the base config class's attribute map.
            base_class = CONFIG_MAPPING[base["model_type"]] if base.get("model_type") in CONFIG_MAPPING else None
            keys = (name, getattr(base_class, "attribute_map", {}).get(name))
            for values in (overrides, base):
                found = next((values[key] for key in keys if key in values), _MISSING)
                if found is not _MISSING:
                    return found
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
