"""`RMTKDConfig`: the base model's config plus the retained rank and provenance of every reduced module."""

from __future__ import annotations

import copy
from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING


SITE_KINDS = ("ffn", "linear", "hidden")
_MISSING = object()
_REQUIRED_RECORD_KEYS = ("kind", "in_features", "out_features", "rank")
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
        reduced_modules (`dict[str, dict]`, *optional*):
            One record per reduced site, keyed by module path inside the base model. Each record holds `kind`
            (`"ffn"`: the inner width of a feed-forward block, or `"linear"`: a low-rank factorisation), `in_features`,
            `out_features` and `rank`; FFN records also hold `producers` (paths of the modules whose outputs form the
            inner width). Provenance per record: `sigma2`, `lambda_plus`, `threshold`, `n_samples`, `estimator`,
            `tau`, `dim`.
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
    calibration: dict | None = None
    weights_sha256: str | None = None

    def __post_init__(self, **kwargs):
        self.reduced_modules = dict(self.reduced_modules or {})
        self.calibration = dict(self.calibration or {})
        base = self.base_config or {}
        # Pipelines read labels from the top-level config; default them from the base model's.
        if kwargs.get("id2label") is None and self.id2label is None and base.get("id2label"):
            self.id2label = {int(k): v for k, v in base["id2label"].items()}
            self.label2id = dict(base.get("label2id") or {v: k for k, v in self.id2label.items()})
        super().__post_init__(**kwargs)
        self.validate_records()

    def record_calibration(self, fingerprint: str, n_tokens: int, options: dict) -> None:
        """Record the calibration behind the last reduction: data fingerprint (sha256), token count, and the spectral
        options as their own dict (`dataclasses.asdict(SpectralOptions)`)."""
        self.calibration = {"fingerprint": fingerprint, "n_tokens": int(n_tokens), **options}

    def validate_records(self) -> None:
        """Check every `reduced_modules` record; raises `ValueError` naming the module, the field and the value."""
        for path, record in self.reduced_modules.items():
            missing = [key for key in _REQUIRED_RECORD_KEYS if key not in record]
            if missing:
                raise ValueError(
                    f"`reduced_modules[{path!r}]` is missing {missing}; every record needs {_REQUIRED_RECORD_KEYS}."
                )
            if record["kind"] not in SITE_KINDS:
                raise ValueError(
                    f"`reduced_modules[{path!r}].kind` must be one of {SITE_KINDS}, got {record['kind']!r}."
                )
            for key in ("in_features", "out_features", "rank"):
                if not isinstance(record[key], int) or record[key] < 1:
                    raise ValueError(f"`reduced_modules[{path!r}].{key}` must be a positive int, got {record[key]!r}.")
            if record["kind"] == "ffn" and not record.get("producers"):
                raise ValueError(f"`reduced_modules[{path!r}]` is an FFN record without `producers`.")

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
        """Base-config values changed by a reduction (the hidden-width site sets `hidden_size` and friends)."""
        overrides = {}
        for record in (self.reduced_modules or {}).values():
            overrides.update(record.get("config_overrides") or {})
        return overrides

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: serve the base config's values of the common attributes.
        if name in _FORWARDED_ATTRIBUTES:
            base = self.__dict__.get("base_config") or {}
            overrides = self.config_overrides() if "reduced_modules" in self.__dict__ else {}
            # GPT-2 and others store `hidden_size` as `n_embd`: follow the base config class's attribute map.
            base_class = CONFIG_MAPPING[base["model_type"]] if base.get("model_type") in CONFIG_MAPPING else None
            keys = (name, getattr(base_class, "attribute_map", {}).get(name))
            for values in (overrides, base):
                found = next((values[key] for key in keys if key in values), _MISSING)
                if found is not _MISSING:
                    return found
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
