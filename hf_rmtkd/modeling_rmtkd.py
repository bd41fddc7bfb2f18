"""RMTKD model classes: rebuild the reduced shapes of any supported architecture from `RMTKDConfig` alone.

This file and the ones it imports relatively (configuration_rmtkd, records, integrity, structure, surgery, hidden_reload,
layers, sites) are copied next to every saved checkpoint, so it also loads with `trust_remote_code=True` where hf_rmtkd is not
installed: keep their imports to torch, transformers, the standard library and each other (flat files, no packages).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PreTrainedModel,
)
from transformers.dynamic_module_utils import custom_object_save

from .configuration_rmtkd import RMTKDConfig
from .integrity import raise_on_bad_weights, safetensors_sha256, verify_weights, weight_files
from .layers import LowRankEmbedding
from .records import FFNRecord
from .sites import find_embedding_sites
from .structure import apply_structure


# Written into every saved config: where the classes live in the code files that travel with the checkpoint.
AUTO_MAP = {
    "AutoConfig": "configuration_rmtkd.RMTKDConfig",
    "AutoModel": "modeling_rmtkd.RMTKDModel",
    "AutoModelForSequenceClassification": "modeling_rmtkd.RMTKDForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_rmtkd.RMTKDForTokenClassification",
    "AutoModelForCausalLM": "modeling_rmtkd.RMTKDForCausalLM",
    "AutoModelForImageClassification": "modeling_rmtkd.RMTKDForImageClassification",
}


def _architecture_class(name: str, config) -> type[PreTrainedModel]:
    """Class for an architecture name: a transformers class, or one registered with an Auto class."""
    import transformers

    cls = getattr(transformers, name, None)
    if cls is not None:
        return cls
    for auto in (
        AutoModel,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoModelForCausalLM,
        AutoModelForImageClassification,
    ):
        try:
            candidate = auto._model_mapping[type(config)]
        except KeyError:
            continue
        if candidate.__name__ == name:
            return candidate
    raise ValueError(
        f"Unknown base architecture {name!r}: it is neither in transformers nor registered with an Auto class."
    )


class _DelegatingForward:
    """`forward` of the RMTKD classes: calls the inner model and exposes its signature.

    On an instance it returns a function with the inner model's signature, so Trainer keeps the right dataset
    columns and pipelines see the inputs they expect; the call goes through the inner module's `__call__` (its hooks
    fire) and looks `self.model` up per call (an undone reduction swaps it). On the class it returns a generic
    function whose `labels` parameter lets Trainer find the label names. Assigning `forward` (as accelerate does for
    mixed precision) stores an override on the instance.
    """

    def __get__(self, obj, objtype=None):
        if obj is None:

            def forward(self, *args, labels=None, **kwargs):
                return self.model(*args, labels=labels, **kwargs)

            if objtype is not None and objtype._task_auto_class is AutoModel:
                forward.__signature__ = inspect.signature(lambda self, *args, **kwargs: None)
            return forward
        override = obj.__dict__.get("_forward_override")
        if override is not None:
            return override

        def forward(*args, **kwargs):
            return obj.model(*args, **kwargs)

        forward.__signature__ = inspect.signature(obj.model.forward)
        forward.__doc__ = obj.model.forward.__doc__
        return forward

    def __set__(self, obj, value):
        obj.__dict__["_forward_override"] = value


class RMTKDPreTrainedModel(PreTrainedModel):
    """Base of the RMTKD model classes: a reduced Hugging Face model held as `self.model`.

    `RMTKDFor<Task>(config)` builds the base architecture for its task from `config.base_config`, then replaces every
    module recorded in `config.reduced_modules` by one of the reduced shape, so `from_pretrained` needs nothing else.
    Loading a checkpoint with the base-model class (`AutoModel`) of a task checkpoint keeps only the encoder/decoder.
    """

    config_class = RMTKDConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _task_auto_class = AutoModel
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # The tokenizer or processor `save_pretrained` writes beside the weights (set by `hf_rmtkd.compress`).
    processing_class = None

    def __init__(self, config: RMTKDConfig, model: PreTrainedModel | None = None):
        super().__init__(config)
        if model is None:
            architecture, prefix = self._resolve_architecture(config)
            base_config = config.get_base_config()
            model = architecture(base_config)
            apply_structure(model, self._records_for(config, prefix), config.hidden_width)
        self.model = model
        self.main_input_name = getattr(model, "main_input_name", "input_ids")
        # Spectra of the reductions made in this session (module path -> SiteReport without eigenvectors), for the
        # model card's plots; not saved with the weights.
        self.rmtkd_spectra: dict = {}
        self.post_init()

    # -- architecture resolution -------------------------------------------------------------------------------
    @classmethod
    def _resolve_architecture(cls, config: RMTKDConfig) -> tuple[type[PreTrainedModel], str]:
        """The class to build for this task and the prefix dropped from the saved module paths ('' if none)."""
        if not isinstance(config.base_architecture, str) or not config.base_architecture:
            raise ValueError(
                "This RMTKD config has no `base_architecture` (the class name of the uncompressed model, e.g. "
                "'BertForSequenceClassification'): its config.json was edited or written by hand. Restore the field "
                "from the original checkpoint."
            )
        base_config = config.get_base_config()
        saved = _architecture_class(config.base_architecture, base_config)
        expected = getattr(saved, "config_class", None)
        if isinstance(expected, type) and not isinstance(base_config, expected):
            raise ValueError(
                f"The checkpoint's base config (`base_config.model_type` {base_config.model_type!r}) does not match "
                f"its architecture {config.base_architecture} (model_type {getattr(expected, 'model_type', '?')!r}): "
                "config.json was edited or does not belong to these weights. Restore it from the original checkpoint."
            )
        try:
            task_class = cls._task_auto_class._model_mapping[type(base_config)]
        except KeyError:
            task_class = None
        if task_class is None or task_class is saved:
            return saved, ""
        if cls._task_auto_class is AutoModel and getattr(saved, "base_model_prefix", ""):
            # A task checkpoint loaded as the bare base model: keep what sits under the task model's prefix.
            return task_class, saved.base_model_prefix
        raise ValueError(
            f"This checkpoint holds a {config.base_architecture}; load it with the Auto class of that task, "
            f"not with {cls.__name__}."
        )

    @staticmethod
    def _records_for(config: RMTKDConfig, prefix: str) -> dict:
        """`config.reduced_modules` with paths relative to the base model when a task checkpoint loads as it."""
        if not prefix:
            return config.reduced_modules
        head = prefix + "."
        records = {}
        for path, record in config.reduced_modules.items():
            if path.startswith(head):
                if isinstance(record, FFNRecord):
                    record = dataclasses.replace(record, producers=[p[len(head) :] for p in record.producers])
                records[path[len(head) :]] = record
        return records

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """As [`~transformers.PreTrainedModel.from_pretrained`], plus two guarantees.

        * A task checkpoint loaded as the base model has its key prefix mapped (`model.bert.` -> `model.`).
        * A checkpoint whose weights do not match the ranks in its config raises `ValueError` naming the module and
          both shapes, instead of a silently re-initialised layer.
        * A checkpoint whose config records `weights_sha256` is checked against it (`ValueError` naming the file).
        """
        config = kwargs.pop("config", None)
        hub_kwargs = {
            k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only", "subfolder") if k in kwargs
        }
        if not isinstance(config, RMTKDConfig):
            config = RMTKDConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        _, prefix = cls._resolve_architecture(config)
        if prefix:
            kwargs.setdefault("key_mapping", {rf"^model\.{re.escape(prefix)}\.": "model."})
        user_ignores_mismatch = kwargs.pop("ignore_mismatched_sizes", False)
        want_info = kwargs.pop("output_loading_info", False)
        # transformers would raise a bare RuntimeError on a size mismatch; load leniently, then raise our own error.
        model, info = super().from_pretrained(
            pretrained_model_name_or_path,
            *model_args,
            config=config,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            **kwargs,
        )
        if not user_ignores_mismatch:
            raise_on_bad_weights(model, info, pretrained_model_name_or_path)
        if kwargs.get("state_dict") is None and kwargs.get("gguf_file") is None:
            hub_kwargs.pop("local_files_only", None)
            verify_weights(config.weights_sha256, pretrained_model_name_or_path, kwargs.get("variant"), **hub_kwargs)
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, is_main_process: bool = True, **kwargs):
        """As [`~transformers.PreTrainedModel.save_pretrained`], plus the model code.

        The config gets an `auto_map` and the code files (`configuration_rmtkd.py`, `modeling_rmtkd.py` and the
        modules they import) are copied beside the weights, so the folder (or a Hub repo made from it) also loads with
        `AutoModelFor<Task>.from_pretrained(path, trust_remote_code=True)` on a machine without hf_rmtkd. The config
        records the sha256 of the weights as written (`weights_sha256`, checked by `from_pretrained`), and the
        `processing_class` (tokenizer or processor), if any, is saved beside them. With `push_to_hub=True` the upload
        comes last, through [`push_to_hub`] (`repo_id`, default the folder's name; `commit_message`, `private`,
        `token`, `revision`, `create_pr`), so the Hub gets the finished folder: hash, code and the RMT-KD model card.
        """
        if self.__dict__.get("_rmtkd_int8"):
            raise ValueError(
                "This is a dynamic int8 copy (hf_rmtkd.quantization.quantize_int8): its packed int8 layers cannot be "
                "saved as safetensors. Save the float RMTKD model and quantize after loading, or export to ONNX and "
                "quantize that (hf_rmtkd.quantization.export_onnx_int8)."
            )
        push = kwargs.pop("push_to_hub", False)
        hub_keys = ("repo_id", "commit_message", "commit_description", "private", "token", "revision", "create_pr")
        hub = {key: kwargs.pop(key) for key in hub_keys if key in kwargs}
        self.config.auto_map = dict(AUTO_MAP)
        # No stale hash in the config written with the weights; the new one is written once they are on disk.
        self.config.weights_sha256 = None
        super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            custom_object_save(self, save_directory)
            files = weight_files(save_directory, kwargs.get("variant"))
            if files:
                self.config.weights_sha256 = safetensors_sha256(files)
                self.config.save_pretrained(save_directory)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(save_directory)
        if push and is_main_process:
            # transformers would upload inside its own save, before the hash, the code and the card exist.
            self.push_to_hub(hub.pop("repo_id", None) or Path(save_directory).name, **hub)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
        model_card_kwargs: dict | None = None,
    ):
        """Upload weights, config, model code, the RMT-KD model card and the spectrum plots to `repo_id`.

        Same arguments as [`~transformers.PreTrainedModel.push_to_hub`], plus `model_card_kwargs`, passed to
        [`hf_rmtkd.model_card.build_model_card`] (`base_model`, `datasets`, `metrics`, `latency_ratio`, ...).
        Unchanged files are not uploaded again, and a push that changes nothing makes no commit.

        Returns:
            `huggingface_hub.CommitInfo` of the commit (or of the current head when nothing changed).
        """
        try:
            from hf_rmtkd.hub import push_model_to_hub
        except ImportError as error:
            raise ImportError(
                "Pushing an RMTKD model with its model card needs hf_rmtkd: pip install hf_rmtkd."
            ) from error
        return push_model_to_hub(
            self,
            repo_id,
            commit_message=commit_message,
            commit_description=commit_description,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
            max_shard_size=max_shard_size,
            tags=tags,
            model_card_kwargs=model_card_kwargs,
        )

    # -- delegation ---------------------------------------------------------------------------------------------
    @property
    def rmtkd_inner_model(self) -> PreTrainedModel:
        """The reduced Hugging Face model whose module paths `config.reduced_modules` refers to."""
        return self.model

    forward = _DelegatingForward()

    def _init_weights(self, module: nn.Module) -> None:
        # The wrapper owns no parameters; the inner model initialises its own modules.
        return

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Module:
        """As `PreTrainedModel.resize_token_embeddings` (run by the inner model, so an untied LM head follows and a
        tied one stays tied), with the new vocabulary size written into `config.base_config` and the table's record,
        so the saved checkpoint reloads. A factorised table ([`LowRankEmbedding`]) resizes its `(V, rank)` table:
        added rows are initialised as transformers initialises a plain table's, in the rank-`k` space (with
        `mean_resizing`, from the old rows' mean and covariance there).

        Returns:
            The input token table (`nn.Embedding` or `LowRankEmbedding`).
        """
        table = self.model.get_input_embeddings()
        factorised = isinstance(table, LowRankEmbedding)
        if factorised:
            # transformers resizes an `nn.Embedding` in place: hand it the `(V, rank)` table for the duration.
            self.model.set_input_embeddings(table.down)
        try:
            self.model.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        finally:
            if factorised:
                self.model.set_input_embeddings(table)
        vocab = self.model.config.vocab_size
        if factorised:
            table.num_embeddings, table.padding_idx = vocab, table.down.padding_idx
            self.config.reduced_modules[find_embedding_sites(self.model)[0].name].in_features = vocab
        self.config.base_config["vocab_size"] = vocab
        return self.model.get_input_embeddings()

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        return self.model.num_parameters(only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)


class RMTKDModel(RMTKDPreTrainedModel):
    """Reduced base model (encoder or decoder without a head); `AutoModel` target."""

    _task_auto_class = AutoModel


class RMTKDForSequenceClassification(RMTKDPreTrainedModel):
    """Reduced sequence classifier; `AutoModelForSequenceClassification` target."""

    _task_auto_class = AutoModelForSequenceClassification


class RMTKDForTokenClassification(RMTKDPreTrainedModel):
    """Reduced token classifier; `AutoModelForTokenClassification` target."""

    _task_auto_class = AutoModelForTokenClassification


class RMTKDForImageClassification(RMTKDPreTrainedModel):
    """Reduced image classifier; `AutoModelForImageClassification` target."""

    _task_auto_class = AutoModelForImageClassification
    main_input_name = "pixel_values"


class RMTKDForCausalLM(RMTKDPreTrainedModel):
    """Reduced causal LM; `AutoModelForCausalLM` target. `generate()` runs the inner model's generation."""

    _task_auto_class = AutoModelForCausalLM

    @classmethod
    def can_generate(cls) -> bool:
        return True

    def generate(self, *args, **kwargs):
        """[`~transformers.GenerationMixin.generate`] of the reduced inner model."""
        return self.model.generate(*args, **kwargs)

    @property
    def generation_config(self):
        return self.model.generation_config if "model" in self._modules else self.__dict__.get("_generation_config")

    @generation_config.setter
    def generation_config(self, value):
        if "model" in self._modules:
            self.model.generation_config = value
        else:
            self.__dict__["_generation_config"] = value


TASK_CLASSES: tuple[type[RMTKDPreTrainedModel], ...] = (
    RMTKDForCausalLM,
    RMTKDForSequenceClassification,
    RMTKDForTokenClassification,
    RMTKDForImageClassification,
    RMTKDModel,
)


def wrapper_class_for(model: PreTrainedModel) -> type[RMTKDPreTrainedModel]:
    """The RMTKD class whose Auto class maps `model`'s config to `model`'s class (`RMTKDModel` otherwise)."""
    for cls in TASK_CLASSES:
        try:
            if cls._task_auto_class._model_mapping[type(model.config)] is type(model):
                return cls
        except KeyError:
            continue
    return RMTKDModel
