"""`RMTKDTrainingArguments`: `TrainingArguments` plus distillation, schedule, calibration and stop rules."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainingArguments

from .analysis import SpectralOptions
from .distillation import EMBEDDING_DISTANCES
from .sites import CONVOLUTIONS, site_kinds
from .surgery import FFN_METHODS


TEACHERS = ("self", "original", "external")
SCHEDULES = ("layerwise", "all_at_once", "none")
# The one table from training arguments to `SpectralOptions` fields (option -> argument); `seed` comes from `seed`.
SPECTRAL_FIELDS = {
    "estimator": "reduction_estimator",
    "tau": "reduction_tau",
    "bulk_fraction": "reduction_bulk_fraction",
    "false_alarm": "reduction_false_alarm",
    "centered": "reduction_centered",
    "max_samples": "calibration_max_tokens",
    "min_rank_ratio": "reduction_min_rank_ratio",
    "rank_multiple": "reduction_rank_multiple",
    "max_output_error": "reduction_max_output_error",
}


@dataclass
class RMTKDTrainingArguments(TrainingArguments):
    r"""
    [`~transformers.TrainingArguments`] for [`RMTKDTrainer`]: self-distillation and scheduled spectral reductions.

    Args:
        distillation_alpha (`float`, *optional*, defaults to 0.7):
            Weight of the cross-entropy in `alpha * CE + (1 - alpha) * T^2 * KL(p_old || p_new)`, in [0, 1]. 0.7 is
            the paper's value.
        distillation_temperature (`float`, *optional*, defaults to 1.0):
            Softmax temperature `T` of teacher and student, > 0.
        distillation_teacher (`str`, *optional*):
            Default `"external"` when the trainer gets a `teacher_model`, else `"self"` for task models and
            `"original"` for a `SentenceTransformer` (measured: on BBC News
            retrieval a chain of pre-reduction teachers recovered nothing, 29.9% recall@1 against 49.4% from the
            original; an embedding model has no labels to anchor the chain). `"self"`: a frozen copy of the model taken just before each reduction (the paper's `p_old`); no copy
            exists before the first reduction. `"original"`: a frozen copy of the model as it was given, for the whole
            run (its states reach the reduced model through the composed kept bases): the targets do not drift with
            each reduction. `"external"`: the `teacher_model` passed to the trainer.
        distillation_hidden_weight (`float`, *optional*):
            Default 1.0 with `reduction_hidden_width`, else 0.0 (measured: a full SST-2 epoch at 74.5% fewer
            parameters, two seeds, 87.56% with both representation terms against 86.47% with logits only).
            Weight of the hidden-state term, >= 0: per position `||z_s - h_t M||^2 / ||h_t M||^2` averaged over every
            layer's output and the embeddings, with `M` the kept basis where a hidden-width reduction changed the
            width (identity elsewhere). Logged as `hidden_loss`. See [`hf_rmtkd.representation`].
        distillation_attention_weight (`float`, *optional*):
            Default as for `distillation_hidden_weight`. Weight of the attention term, >= 0: `KL(teacher || student)` of every layer's attention distributions per
            query, averaged over heads (MiniLM / TinyBERT style). Switches the model and teacher to eager attention
            (the only kind that returns the probabilities). Logged as `attention_loss`.
        distillation_embedding_distance (`str`, *optional*, defaults to `"cosine"`):
            For a `SentenceTransformer` (no task head, so no CE / KL): the distance between the student's sentence
            embeddings and the teacher's (through the kept basis where the width changed), `"cosine"`, `"mse"` or
            `"l2"`. It replaces the logits loss and is logged as `embedding_loss`.
        reduction_target_modules (`list[str]` or `str`, *optional*):
            Sites to reduce, as `target_modules` of [`hf_rmtkd.analyze`] (name suffixes or a regex); default every
            FFN inner width and every linear layer of the blocks.
        reduction_schedule (`str`, *optional*, defaults to `"layerwise"`):
            `"layerwise"`: one layer's sites per reduction, shallow to deep (the paper); `"all_at_once"`: one reduction;
            `"none"`: no reduction, distillation only (e.g. after `compress`, with an external teacher).
        reduction_recovery_steps (`int`, *optional*):
            Optimizer steps of self-distillation after each reduction before the next. Default: the reductions are
            spread evenly over the first `reduction_span` of training, leaving the rest for recovery.
        reduction_span (`float`, *optional*, defaults to 0.5):
            Fraction of the training steps in which the reductions happen when `reduction_recovery_steps` is unset,
            in (0, 1].
        reduction_warmup_steps (`int`, *optional*, defaults to 0):
            Optimizer steps before the first reduction.
        calibration_fraction (`float`, *optional*, defaults to 0.1):
            Fraction of the training set used for calibration (the paper's 10%), in (0, 1].
        calibration_samples (`int`, *optional*):
            Number of training examples used for calibration; overrides `calibration_fraction`.
        calibration_max_tokens (`int`, *optional*, defaults to 200000):
            Cap on calibration tokens (samples) per site.
        reduction_estimator (`str`, *optional*, defaults to `"bema"`):
            Noise estimator: `"bema"`, `"mp_fit"` (the paper's) or `"quantile"`.
        reduction_tau (`float`, *optional*, defaults to 0.5):
            Quantile `tau` of `"mp_fit"` and `"quantile"`, in (0, 1).
        reduction_bulk_fraction (`float`, *optional*, defaults to 0.2):
            Share of each end of the spectrum `"bema"` trims before matching the bulk, in (0, 0.5).
        reduction_false_alarm (`float`, *optional*, defaults to 0.001):
            Tracy–Widom false-alarm level of the rank rule.
        reduction_centered (`bool`, *optional*, defaults to `True`):
            Centre activations before the covariance (`False`: the paper's uncentred covariance).
        reduction_ffn_method (`str`, *optional*, defaults to `"select"`):
            FFN surgery: `"select"` (neuron selection with least-squares compensation) or `"project"` (the paper's
            fold of the projection).
        reduction_min_rank_ratio (`float`, *optional*, defaults to 0.05):
            Stop rule `rho_min`: no site keeps fewer than `ceil(rho_min * d)` directions, in [0, 1).
        reduction_hidden_width (`bool`, *optional*, defaults to `False`):
            Also reduce the width of the residual stream, as the first scheduled reduction (one projection for the
            whole model; Llama-family and GPT-2 decoders, and BERT, RoBERTa and MPNet encoders, see `hf_rmtkd.hidden`).
        reduction_hidden_steps (`int`, *optional*, defaults to 1):
            Progressive width: reach the MP width in this many scheduled hidden-width reductions, each a geometric
            step (`w * (k_MP / w)^(1 / steps left)`) on a spectrum re-estimated after the previous step's recovery.
        reduction_embeddings (`bool`, *optional*, defaults to `False`):
            Also factorise the input token table (a `(V, k)` table and a `k -> d` map, `k` by the MP rule on the
            table's output over the calibration tokens), after the blocks (with `layerwise`, the last reduction), with the default sites
            (`reduction_target_modules` unset). The table is most of a small encoder (52% of MiniLM, 76% once its
            width is reduced). Refused for a table tied to the output head.
        reduction_convolutions (`str`, *optional*, defaults to `"channels"`):
            How a CNN's block convolutions are reduced: `"channels"` keeps the MP rule's number of each block's inner
            channels (the paper's CNN site), `"factorize"` factorises every block convolution (a `k x k` convolution to
            `k` channels, then a `1 x 1` one back; `k` by the MP rule on its output covariance). It also decides what a
            convolution named in `reduction_target_modules` is.
        reduction_rank_multiple (`int`, *optional*, defaults to 1):
            Round every retained rank up to a multiple of this, >= 1 (8 or 16 for GPU-friendly shapes).
        reduction_max_output_error (`float`, *optional*):
            Per-site output-error budget in (0, 1): every rank is at least the MP rank and keeps the site's relative
            output error (from the calibration statistics, see `hf_rmtkd.output_error`) within it. `None`: the
            paper's rule alone.
        reduction_max_metric_drop (`float`, *optional*):
            Stop rule `epsilon`: before each further reduction and at the end of training the eval metric is compared
            with its value before the last reduction; a drop larger than this undoes that reduction (the model returns
            to the pre-reduction snapshot) and retries it with gentler ranks (`reduction_budget_retries`), then stops
            the schedule. Needs an `eval_dataset` and the metric. Cost: one evaluation per check and per try.
        reduction_budget_retries (`int`, *optional*, defaults to 3):
            Gentler tries of a reduction that broke `reduction_max_metric_drop`, >= 0: the ranks move 1/2, 3/4, 7/8
            ... of the way from the MP rank back to the full width (bisection), each try after one recovery period.
        reduction_metric (`str`, *optional*, defaults to `"eval_loss"`):
            Metric of the `epsilon` rule, a key of `Trainer.evaluate()` (e.g. `"eval_accuracy"` with `compute_metrics`).
        reduction_metric_greater_is_better (`bool`, *optional*):
            Direction of `reduction_metric`; default: `False` for losses, `True` otherwise.
        reduction_target_params (`int`, *optional*):
            Stop rule: no further reduction once the model has at most this many parameters.
    """

    distillation_alpha: float = field(default=0.7, metadata={"help": "Weight of CE in alpha*CE + (1-alpha)*T^2*KL."})
    distillation_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature T, > 0."})
    distillation_teacher: str | None = field(
        default=None,
        metadata={"help": "'self' (pre-reduction copy), 'original' or 'external'; default self (original for ST)."},
    )
    distillation_hidden_weight: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the hidden-state term (through the kept basis), >= 0; default 1 with hidden width."
        },
    )
    distillation_attention_weight: float | None = field(
        default=None,
        metadata={"help": "Weight of the attention-distribution KL term, >= 0; default 1 with hidden width."},
    )
    distillation_embedding_distance: str = field(
        default="cosine", metadata={"help": "SentenceTransformer models: 'cosine', 'mse' or 'l2' between embeddings."}
    )
    reduction_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Sites to reduce: name suffixes (or one regex); default every site."}
    )
    reduction_schedule: str = field(
        default="layerwise", metadata={"help": "'layerwise', 'all_at_once' or 'none' (distillation only)."}
    )
    reduction_recovery_steps: int | None = field(
        default=None,
        metadata={"help": "Optimizer steps after each reduction; default spreads them over reduction_span."},
    )
    reduction_span: float = field(default=0.5, metadata={"help": "Fraction of training in which reductions happen."})
    reduction_warmup_steps: int = field(default=0, metadata={"help": "Optimizer steps before the first reduction."})
    calibration_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of the training set to calibrate on."}
    )
    calibration_samples: int | None = field(
        default=None, metadata={"help": "Examples to calibrate on (overrides the fraction)."}
    )
    calibration_max_tokens: int | None = field(
        default=200_000, metadata={"help": "Cap on calibration tokens per site."}
    )
    reduction_estimator: str = field(default="bema", metadata={"help": "'bema', 'mp_fit' or 'quantile'."})
    reduction_tau: float = field(default=0.5, metadata={"help": "Quantile tau for 'mp_fit' / 'quantile'."})
    reduction_bulk_fraction: float = field(default=0.2, metadata={"help": "BEMA's trimmed share, in (0, 0.5)."})
    reduction_false_alarm: float = field(default=0.001, metadata={"help": "Tracy–Widom false-alarm level."})
    reduction_centered: bool = field(default=True, metadata={"help": "Centre activations before the covariance."})
    reduction_ffn_method: str = field(default="select", metadata={"help": "'select' or 'project'."})
    reduction_min_rank_ratio: float = field(default=0.05, metadata={"help": "Stop rule rho_min on k/d."})
    reduction_hidden_width: bool = field(
        default=False,
        metadata={"help": "Reduce the residual-stream width first (Llama family, GPT-2; BERT, RoBERTa, MPNet)."},
    )
    reduction_hidden_steps: int = field(
        default=1, metadata={"help": "Hidden-width reductions that reach the MP width (geometric steps), >= 1."}
    )
    reduction_embeddings: bool = field(
        default=False,
        metadata={"help": "Also factorise the input token table (the last reduction); not for tied heads."},
    )
    reduction_convolutions: str = field(
        default="channels",
        metadata={"help": "CNN block convolutions: 'channels' (narrow inner channels) or 'factorize' (each conv)."},
    )
    reduction_rank_multiple: int = field(default=1, metadata={"help": "Round ranks up to a multiple of this."})
    reduction_max_output_error: float | None = field(
        default=None,
        metadata={
            "help": "Per-site relative output-error budget in (0, 1): ranks at least the MP rank and within it."
        },
    )
    reduction_max_metric_drop: float | None = field(
        default=None, metadata={"help": "Stop rule epsilon on the eval metric."}
    )
    reduction_budget_retries: int = field(
        default=3, metadata={"help": "Gentler tries of a reduction over the metric budget, >= 0."}
    )
    reduction_metric: str = field(default="eval_loss", metadata={"help": "Key of evaluate() for the epsilon rule."})
    reduction_metric_greater_is_better: bool | None = field(
        default=None, metadata={"help": "Direction of reduction_metric."}
    )
    reduction_target_params: int | None = field(default=None, metadata={"help": "Stop once parameters <= this."})

    def __post_init__(self):
        super().__post_init__()
        self._check_range("distillation_alpha", self.distillation_alpha, 0.0, 1.0, "[0, 1]")
        if not self.distillation_temperature > 0:
            raise ValueError(f"`distillation_temperature` must be > 0, got {self.distillation_temperature}.")
        if self.distillation_teacher is not None:  # None: resolved by the trainer from the model's kind
            self._check_choice("distillation_teacher", self.distillation_teacher, TEACHERS)
        self._check_choice("reduction_schedule", self.reduction_schedule, SCHEDULES)
        self.spectral_options()  # validated once, by SpectralOptions, with this class's field names in the message
        self._check_choice("reduction_ffn_method", self.reduction_ffn_method, FFN_METHODS)
        if self.reduction_recovery_steps is not None and self.reduction_recovery_steps < 1:
            raise ValueError(f"`reduction_recovery_steps` must be >= 1 or None, got {self.reduction_recovery_steps}.")
        if not 0.0 < self.reduction_span <= 1.0:
            raise ValueError(f"`reduction_span` must be in (0, 1], got {self.reduction_span}.")
        if self.reduction_warmup_steps < 0:
            raise ValueError(f"`reduction_warmup_steps` must be >= 0, got {self.reduction_warmup_steps}.")
        if not 0.0 < self.calibration_fraction <= 1.0:
            raise ValueError(f"`calibration_fraction` must be in (0, 1], got {self.calibration_fraction}.")
        if self.calibration_samples is not None and self.calibration_samples < 1:
            raise ValueError(f"`calibration_samples` must be >= 1 or None, got {self.calibration_samples}.")
        if self.reduction_max_metric_drop is not None and self.reduction_max_metric_drop < 0:
            raise ValueError(
                f"`reduction_max_metric_drop` must be >= 0 or None, got {self.reduction_max_metric_drop}."
            )
        for name in ("distillation_hidden_weight", "distillation_attention_weight"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"`{name}` must be >= 0, got {value}.")
        self._check_choice(
            "distillation_embedding_distance", self.distillation_embedding_distance, EMBEDDING_DISTANCES
        )
        if self.reduction_hidden_steps < 1:
            raise ValueError(f"`reduction_hidden_steps` must be >= 1, got {self.reduction_hidden_steps}.")
        if self.reduction_embeddings and self.reduction_target_modules is not None:
            raise ValueError(
                f"`reduction_embeddings`=True applies to the default sites; `reduction_target_modules` is set "
                f"({self.reduction_target_modules!r}): name the token table there instead (e.g. 'word_embeddings')."
            )
        self._check_choice("reduction_convolutions", self.reduction_convolutions, CONVOLUTIONS)
        if self.reduction_budget_retries < 0:
            raise ValueError(f"`reduction_budget_retries` must be >= 0, got {self.reduction_budget_retries}.")
        if self.reduction_target_params is not None and self.reduction_target_params < 1:
            raise ValueError(f"`reduction_target_params` must be >= 1 or None, got {self.reduction_target_params}.")
        if self.reduction_metric_greater_is_better is None:
            self.reduction_metric_greater_is_better = not self.reduction_metric.endswith("loss")

    def site_kinds(self) -> tuple[str, ...]:
        """Site kinds reduced when `reduction_target_modules` is unset."""
        return site_kinds(self.reduction_embeddings, self.reduction_convolutions)

    def term_weight(self, term: str) -> float:
        """The weight of a representation term, `"hidden"` or `"attention"`: the field's value, or when it is unset
        (`None`) 1.0 with `reduction_hidden_width` and 0.0 without. Resolved on use, so `dataclasses.replace(args,
        reduction_hidden_width=True)` gets the hidden-width default too."""
        value = getattr(self, f"distillation_{term}_weight")
        if value is None:
            return 1.0 if self.reduction_hidden_width else 0.0
        return float(value)

    @staticmethod
    def _check_range(name, value, low, high, allowed):
        if not low <= value <= high:
            raise ValueError(f"`{name}` must be in {allowed}, got {value}.")

    @staticmethod
    def _check_choice(name, value, allowed):
        if value not in allowed:
            raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.")

    def spectral_options(self, seed: int | None = None) -> SpectralOptions:
        """The [`SpectralOptions`] of the reductions, through [`SPECTRAL_FIELDS`].

        Raises:
            `ValueError` naming this class's field (e.g. `reduction_tau`), the value and what is allowed.
        """
        values = {option: getattr(self, name) for option, name in SPECTRAL_FIELDS.items()}
        values["seed"] = self.seed if seed is None else seed
        try:
            return SpectralOptions(**values)
        except ValueError as error:
            message = str(error)
            for option, name in SPECTRAL_FIELDS.items():
                message = message.replace(f"`{option}`", f"`{name}`")
            raise ValueError(message) from None


def plain_training_args(
    args: RMTKDTrainingArguments, epochs: float, learning_rate: float, **overrides
) -> TrainingArguments:
    """`TrainingArguments` for plain fine-tuning of a teacher with the compression run's batch sizes, seed and device,
    its own epochs and learning rate, in `<output_dir>/teacher`."""
    shared = ("per_device_train_batch_size", "per_device_eval_batch_size", "weight_decay", "lr_scheduler_type")
    shared += ("warmup_steps", "seed", "data_seed", "use_cpu", "bf16", "dataloader_num_workers", "logging_steps")
    shared += ("disable_tqdm", "tf32")
    values = {name: getattr(args, name) for name in shared}
    values.update(save_strategy="no", report_to=[], **overrides)
    return TrainingArguments(
        output_dir=str(Path(args.output_dir) / "teacher"),
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        **values,
    )
