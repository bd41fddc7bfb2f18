"""`RMTKDTrainer`: `transformers.Trainer` with self-distillation and scheduled spectral reductions."""

from __future__ import annotations

import copy
import inspect
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from .calibration_data import calibration_subset, is_iterable_only
from .compression import to_rmtkd, wrap_existing
from .distillation import distillation_loss
from .kept_basis import stream_maps
from .model_card import TAGS, build_model_card, metrics_from_log_history, spectrum_plots
from .modeling_rmtkd import RMTKDForCausalLM, RMTKDPreTrainedModel
from .pipeline import ReductionPlan, reduce_model
from .records import HIDDEN_SITE
from .representation import output_flags, representation_terms
from .rewire import rewire_trainer
from .run_checkpoint import restore_reductions, save_run_extras
from .schedule import ReductionCallback, layer_groups
from .sentence_models import is_sentence_transformer
from .sites import select_sites
from .training_args import RMTKDTrainingArguments


logger = logging.getLogger(__name__)


class RMTKDTrainer(Trainer):
    """A drop-in [`~transformers.Trainer`] that compresses the model the RMT-KD way while it trains.

    The loss is `alpha * CE + (1 - alpha) * T^2 * KL(p_old || p_new)`; at the scheduled steps a
    [`ReductionCallback`] calibrates, reduces a group of sites with the MP rule, rebuilds the optimizer and refreshes
    the teacher. `save_model` writes the RMTKD checkpoint format.

    Args:
        model (`PreTrainedModel`): the (fine-tuned) model to compress; it is wrapped in its `RMTKDFor<Task>` class.
        args ([`RMTKDTrainingArguments`]): training, distillation, schedule and calibration settings.
        calibration_dataset (`Dataset`, *optional*): data for the activation statistics; default a seeded
            `calibration_fraction` (or `calibration_samples`) of `train_dataset`.
        teacher_model (`PreTrainedModel`, *optional*): external teacher, with `distillation_teacher="external"`.
        **kwargs: everything else [`~transformers.Trainer`] takes.

    Optimizer after a reduction: parameters that survive keep their optimizer state (re-pointed); the new,
    reduced parameters start with fresh moments. The learning-rate schedule continues where it was.
    """

    default_teacher = "self"  # `distillation_teacher` when unset: the paper's pre-reduction copy
    _tag_names = TAGS
    _name = "RMT-KD"
    _paper = {
        "title": "RMT-KD: Random Matrix Theoretic Causal Knowledge Distillation",
        "id": "2509.15724",
        "citation": (
            "@article{ettori2025rmtkd,\n  title={RMT-KD: Random Matrix Theoretic Causal Knowledge Distillation},\n"
            "  author={Ettori, Davide and Darabi, Nastaran and Senthilkumar, Sureshkumar and Trivedi, Amit Ranjan},\n"
            "  journal={arXiv preprint arXiv:2509.15724},\n  year={2025}\n}"
        ),
    }

    def __new__(cls, model=None, *args, **kwargs):
        # A SentenceTransformer (or its folder) has no task head: its run distils embeddings instead of logits.
        if cls is RMTKDTrainer and model is not None and is_sentence_transformer(model):
            from .sentence_trainer import RMTKDSentenceTransformerTrainer

            cls = RMTKDSentenceTransformerTrainer
        return super().__new__(cls)

    def __init__(
        self,
        model=None,
        args: RMTKDTrainingArguments | None = None,
        *pos,
        calibration_dataset=None,
        teacher_model: nn.Module | None = None,
        **kwargs,
    ):
        if args is None:
            args = RMTKDTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, RMTKDTrainingArguments):
            raise TypeError(f"RMTKDTrainer needs RMTKDTrainingArguments, got {type(args).__name__}.")
        if model is None:
            raise ValueError("RMTKDTrainer needs a `model` (model_init is not supported: the reductions change it).")
        if args.distillation_teacher is None:
            args = copy.copy(args)  # the caller's object keeps its None for the next trainer
            args.distillation_teacher = "external" if teacher_model is not None else self.default_teacher
        super().__init__(to_rmtkd(model), args, *pos, **kwargs)
        # Our loss divides its sums by `num_items_in_batch` itself; Trainer must not rescale it again.
        self.model_accepts_loss_kwargs = True
        self.calibration_dataset = calibration_dataset
        self.teacher = self._prepare_teacher(teacher_model)
        self._snapshot: RMTKDPreTrainedModel | None = None
        self._terms: dict[str, list[torch.Tensor]] = {"ce_loss": [], "kl_loss": []}
        self._validate()
        self._attn_implementation = getattr(self.model.model.config, "_attn_implementation", None)
        self.reduction_callback = ReductionCallback(self)
        self.add_callback(self.reduction_callback)

    # -- construction-time checks ----------------------------------------------------------------------------
    def _validate(self) -> None:
        args = self.args
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise NotImplementedError(
                "RMTKDTrainer does not support FSDP or DeepSpeed yet: their sharded parameters cannot be reshaped in "
                "place. Use DDP (torchrun / accelerate launch --multi_gpu)."
            )
        select_sites(self.model.model, args.reduction_target_modules, args.site_kinds())  # raises on bad names
        if args.reduction_max_metric_drop is not None:
            if self.eval_dataset is None:
                raise ValueError("`reduction_max_metric_drop` needs an `eval_dataset` to measure the drop.")
            if args.reduction_metric != "eval_loss" and self.compute_metrics is None:
                raise ValueError(
                    f"`reduction_metric`={args.reduction_metric!r} needs `compute_metrics` (only 'eval_loss' is "
                    "available without it)."
                )
        if args.reduction_max_metric_drop is not None and not args.reduction_metric.startswith("eval_"):
            raise ValueError(
                f"`reduction_metric`={args.reduction_metric!r} must be a key of `Trainer.evaluate()`, which all start "
                "with 'eval_' (e.g. 'eval_loss', 'eval_accuracy')."
            )
        dataset, example = self.train_dataset, None
        if dataset is not None and is_iterable_only(dataset):
            if (
                self.calibration_dataset is None
                and args.calibration_samples is None
                and args.reduction_schedule != "none"
            ):
                calibration_subset(dataset, args)  # raises: says what to set
            # the first example is not peeked: that could consume a stream
        elif dataset is not None and len(dataset):
            example = dataset[0]
        self._validate_task(example)

    def _validate_task(self, example) -> None:
        """A task model: a head that takes labels, and labelled training examples (`example` is the first, if any)."""
        accepted = inspect.signature(self.model.model.forward).parameters
        if not any("label" in name for name in accepted):
            raise ValueError(
                f"{type(self.model.model).__name__} takes no labels and returns no `logits`; RMTKDTrainer needs a model "
                "with a task head (AutoModelForSequenceClassification, ...ForTokenClassification, ...ForCausalLM, "
                "...ForImageClassification) or a SentenceTransformer."
            )
        if isinstance(example, dict) and not any(k in example for k in ("labels", "label", "label_ids")):
            raise ValueError(
                f"The training dataset has no labels (columns: {sorted(example)}); RMT-KD's loss needs a "
                "`labels` column for its cross-entropy term."
            )

    def _prepare_teacher(self, teacher_model):
        mode = self.args.distillation_teacher
        if mode == "external" and teacher_model is None:
            raise ValueError("`distillation_teacher='external'` needs a `teacher_model`.")
        if mode != "external" and teacher_model is not None:
            raise ValueError(f"A `teacher_model` was given but `distillation_teacher={mode!r}`; set it to 'external'.")
        if mode == "original":
            return self._take_snapshot()
        if teacher_model is None:
            return None
        return self._freeze(teacher_model.to(self.args.device))

    @staticmethod
    def _freeze(model: nn.Module) -> nn.Module:
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return model

    # -- loss ----------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Training: `alpha * CE + (1 - alpha) * T^2 * KL + w_h * hidden + w_a * attention` (the last two only with
        their weights set), exact under gradient accumulation. Evaluation: the task's cross-entropy alone, so
        `eval_loss` means what it means for a plain `Trainer`."""
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError(f"The batch has no `labels` (keys: {sorted(inputs)}); RMTKDTrainer needs labels.")
        features = {k: v for k, v in inputs.items() if k != "labels"}
        flags = output_flags(self.args, self.model.model, self.teacher) if model.training else {}
        outputs = model(**features, **flags)
        logits = getattr(outputs, "logits", None)
        if logits is None:
            raise ValueError(
                f"{type(self.model.model).__name__} returned no `logits`; RMTKDTrainer needs a model with a task head "
                "(AutoModelForSequenceClassification, ...ForTokenClassification, ...ForCausalLM, ...ForImageClassification)."
            )
        teacher_outputs = None
        if self.teacher is not None and model.training:
            with torch.no_grad():
                teacher_outputs = self.teacher(**features, **flags)
        shift = isinstance(self.model, RMTKDForCausalLM)
        terms = distillation_loss(
            logits,
            labels,
            None if teacher_outputs is None else teacher_outputs.logits,
            self.args.distillation_alpha,
            self.args.distillation_temperature,
            num_items_in_batch,
            shift_labels=shift,
        )
        if not model.training:
            return (terms.ce, outputs) if return_outputs else terms.ce
        loss = terms.loss
        extra = {}
        if teacher_outputs is not None:
            mask = features.get("attention_mask")
            extra = representation_terms(
                flags, self.model, outputs, teacher_outputs, labels, num_items_in_batch, mask, shift
            )
        for name, value in extra.items():
            loss = loss + self.args.term_weight(name) * value
        for name, value in {"ce": terms.ce, "kl": terms.kl, **extra}.items():
            self._terms.setdefault(f"{name}_loss", []).append(value.detach())
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts all ranks, while DDP averages gradients over ranks.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        # After a reduction the DDP wrapper is rebuilt; the loop's local `model` still points at the old one.
        return super().training_step(
            self.model_wrapped if self.model_wrapped is not None else model, inputs, num_items_in_batch
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the mean of every loss term since the last training log (`ce_loss`, `kl_loss`, and `hidden_loss`,
        `attention_loss` when their weights are set)."""
        if "loss" in logs:
            for key, values in self._terms.items():
                if values:
                    logs[key] = round(float(torch.stack(values).mean()), 6)
                    values.clear()
        super().log(logs, start_time)

    # -- reductions -----------------------------------------------------------------------------------------
    def reduction_groups(self) -> list[list[str]]:
        """Site names per scheduled reduction, from `reduction_target_modules` and `reduction_schedule`."""
        sites = select_sites(self.model.model, self.args.reduction_target_modules, self.args.site_kinds())
        groups = layer_groups(sites, self.args.reduction_schedule)
        if self.args.reduction_hidden_width and self.args.reduction_schedule != "none":
            # First, in `reduction_hidden_steps` steps: every other site's recorded shapes depend on the width.
            groups = [[HIDDEN_SITE]] * self.args.reduction_hidden_steps + groups
        return groups

    def _calibration_data(self):
        dataset = self.calibration_dataset
        if dataset is None:
            dataset = calibration_subset(self.train_dataset, self.args)
        # The eval loader shards the data across ranks; the statistics are summed over ranks afterwards.
        return self.get_eval_dataloader(dataset)

    def _take_snapshot(self) -> RMTKDPreTrainedModel:
        model = self.model
        # Copy config and inner model, not the wrapper: accelerate may patch the wrapper's `forward` in place.
        snapshot = wrap_existing(type(model), copy.deepcopy(model.config), copy.deepcopy(model.model))
        snapshot.__dict__["rmtkd_stream_maps"] = list(stream_maps(model))
        return self._freeze(snapshot)

    def run_reduction(self, index: int, names: list[str], steps_left: int = 1, relaxation: float = 0.0) -> dict:
        """Reduce one scheduled group now and return its history entry.

        Args:
            index: position of the group in the schedule.
            names: site names, or `["hidden_size"]` for a hidden-width step.
            steps_left: hidden-width steps left including this one (progressive width).
            relaxation: share of the way from each MP rank back to the full width, in [0, 1) (the metric budget's
                gentler retries; see [`ReductionCallback`]).
        """
        args, model = self.args, self.model
        self._snapshot = self._take_snapshot()
        if args.distillation_teacher == "self":
            self.teacher = self._snapshot
        hidden = names == [HIDDEN_SITE]
        plan = ReductionPlan(
            target_modules=[] if hidden else names,
            hidden_steps_left=steps_left if hidden else 0,
            ffn_method=args.reduction_ffn_method,
            relaxation=relaxation,
            convolutions=args.reduction_convolutions,
        )
        progress = self.is_world_process_zero() and not args.disable_tqdm
        options = args.spectral_options()
        result = reduce_model(model, self._calibration_data(), options, plan, progress)
        rewire_trainer(self)
        logs = {"rmtkd/reduction": float(index), "rmtkd/params_before": float(result.params_before)}
        logs["rmtkd/params_after"] = float(result.params_after)
        sites = {
            n: {"d": s.dim, "k": s.rank, "n": s.n_samples, "sigma2": s.sigma2, "lambda_plus": s.lambda_plus}
            for n, s in result.report.items()
        }
        for name, site in sites.items():
            for key in ("d", "k", "sigma2", "lambda_plus"):
                logs[f"rmtkd/{name}/{key}"] = float(site[key])
        self.log(logs)
        if self.is_world_process_zero():
            result.report.plot(Path(args.output_dir) / "spectra" / f"reduction_{index:02d}")
        return {
            "index": index,
            "step": self.state.global_step,
            "params_before": result.params_before,
            "params_after": result.params_after,
            "reduced": sorted(result.records),
            "sites": sites,
        }

    def budget_metric(self) -> float:
        """The `reduction_metric` of a fresh evaluation (`ValueError` naming the keys if it is not among them)."""
        metrics = self.evaluate()
        if self.args.reduction_metric not in metrics:
            raise ValueError(
                f"`reduction_metric`={self.args.reduction_metric!r} is not among the evaluation's metrics "
                f"{sorted(metrics)}: set it to one of them."
            )
        return float(metrics[self.args.reduction_metric])

    def undo_reduction(self, final: bool = False) -> None:
        """Return the model to the snapshot taken before the last reduction (and drop that reduction's teacher)."""
        snapshot = self._snapshot
        for parameter in snapshot.parameters():
            parameter.requires_grad_(True)
        self.model.model = snapshot.model
        self.model.config.reduced_modules = snapshot.config.reduced_modules
        self.model.config.hidden_width = snapshot.config.hidden_width
        self.model.__dict__["rmtkd_stream_maps"] = stream_maps(snapshot)
        if self.args.distillation_teacher == "self":
            # The snapshot was the teacher; it is the model again, so there is none until the next reduction.
            self.teacher = None
        if not final:
            rewire_trainer(self)

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        if self.is_world_process_zero():
            # Before Trainer's own files: a checkpoint that has a trainer_state.json always has these too.
            save_run_extras(self, Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}")
        super()._save_checkpoint(model, trial)

    def _after_restore(self) -> None:
        """Hook after a resumed run's reduced shapes are rebuilt (what else follows the model's width)."""

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        latency_ratio: float | None = None,
    ) -> None:
        """Write the RMT-KD model card (`README.md`) to `output_dir`, on the main process only.

        Metrics before compression are the first evaluation logged before the first reduction, metrics after the last
        evaluation; the spectrum plots are those written under `output_dir/spectra`. Anything not measured shows as
        unknown. A failure here is logged, never raised: it must not cost a finished training run its upload.
        """
        if not self.is_world_process_zero():
            return
        try:
            history = self.reduction_callback.history
            first_step = history[0]["step"] if history else None
            if isinstance(tags, str):
                tags = [tags]
            card = build_model_card(
                self.accelerator.unwrap_model(self.model),
                repo_id=self.hub_model_id,
                base_model=finetuned_from,
                datasets=dataset_tags or dataset,
                metrics=metrics_from_log_history(self.state.log_history, first_step),
                latency_ratio=latency_ratio,
                plots=spectrum_plots(self.args.output_dir),
                tags=tags,  # build_model_card adds the RMT-KD tags
                model_name=model_name,
                license=license,
            )
            card.save(Path(self.args.output_dir) / "README.md")
        except Exception as error:
            logger.error("Could not write the RMT-KD model card: %s. The model itself is saved.", error)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """As [`~transformers.Trainer.train`]; resuming first rebuilds the reduced shapes, schedule and teacher."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No checkpoint found in {self.args.output_dir} to resume from.")
        if resume_from_checkpoint:
            restore_reductions(self, Path(resume_from_checkpoint))
            self._after_restore()
        output = super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )
        inner = self.model.model
        if (
            self._attn_implementation
            and getattr(inner.config, "_attn_implementation", None) != self._attn_implementation
        ):
            # The attention term needed eager attention while training; the result serves with what it had.
            inner.set_attn_implementation(self._attn_implementation)
            inner.__dict__.pop("_rmtkd_eager_attention", None)
        return output
