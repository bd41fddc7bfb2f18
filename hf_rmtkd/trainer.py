"""`RMTKDTrainer`: `transformers.Trainer` with self-distillation and scheduled spectral reductions."""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from .analysis import SpectralOptions, SpectralReport, analyze_sites
from .compression import apply_report, to_rmtkd, wrap_existing
from .distillation import distillation_loss
from .hidden import HIDDEN_KEY, reduce_hidden
from .model_card import TAGS, build_model_card, metrics_from_log_history, spectrum_plots
from .modeling_rmtkd import RMTKDForCausalLM, RMTKDPreTrainedModel
from .optimizer_state import carry_optimizer_state
from .schedule import ReductionCallback, layer_groups
from .sites import select_sites
from .surgery import apply_structure
from .training_args import RMTKDTrainingArguments


logger = logging.getLogger(__name__)
TEACHER_DIR = "rmtkd_teacher"


def calibration_subset(dataset, args: RMTKDTrainingArguments):
    """The default calibration set: a seeded `calibration_samples` (else `calibration_fraction`) of `dataset`."""
    count = min(args.calibration_samples or math.ceil(args.calibration_fraction * len(dataset)), len(dataset))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))[:count]
    indices = sorted(order.tolist())
    return dataset.select(indices) if hasattr(dataset, "select") else torch.utils.data.Subset(dataset, indices)


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
        super().__init__(to_rmtkd(model), args, *pos, **kwargs)
        # Our loss divides its sums by `num_items_in_batch` itself; Trainer must not rescale it again.
        self.model_accepts_loss_kwargs = True
        self.calibration_dataset = calibration_dataset
        self.teacher = self._prepare_teacher(teacher_model)
        self._snapshot: RMTKDPreTrainedModel | None = None
        self._terms = {"ce_loss": [], "kl_loss": []}
        self._validate()
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
        accepted = inspect.signature(self.model.model.forward).parameters
        if not any("label" in name for name in accepted):
            raise ValueError(
                f"{type(self.model.model).__name__} takes no labels and returns no `logits`; RMTKDTrainer needs a model "
                "with a task head (AutoModelForSequenceClassification, ...ForTokenClassification, ...ForCausalLM, "
                "...ForImageClassification)."
            )
        select_sites(self.model.model, args.reduction_target_modules)  # raises on names that match nothing
        if args.reduction_max_metric_drop is not None:
            if self.eval_dataset is None:
                raise ValueError("`reduction_max_metric_drop` needs an `eval_dataset` to measure the drop.")
            if args.reduction_metric != "eval_loss" and self.compute_metrics is None:
                raise ValueError(
                    f"`reduction_metric`={args.reduction_metric!r} needs `compute_metrics` (only 'eval_loss' is "
                    "available without it)."
                )
        if self.train_dataset is not None and hasattr(self.train_dataset, "__getitem__") and len(self.train_dataset):
            example = self.train_dataset[0]
            if isinstance(example, dict) and not any(k in example for k in ("labels", "label", "label_ids")):
                raise ValueError(
                    f"The training dataset has no labels (columns: {sorted(example)}); RMT-KD's loss needs a "
                    "`labels` column for its cross-entropy term."
                )

    def _prepare_teacher(self, teacher_model):
        mode = self.args.distillation_teacher
        if mode == "external" and teacher_model is None:
            raise ValueError("`distillation_teacher='external'` needs a `teacher_model`.")
        if mode == "self" and teacher_model is not None:
            raise ValueError("A `teacher_model` was given but `distillation_teacher='self'`; set it to 'external'.")
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
        """`alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)`, exact under gradient accumulation."""
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError(f"The batch has no `labels` (keys: {sorted(inputs)}); RMTKDTrainer needs labels.")
        features = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**features)
        logits = getattr(outputs, "logits", None)
        if logits is None:
            raise ValueError(
                f"{type(self.model.model).__name__} returned no `logits`; RMTKDTrainer needs a model with a task head "
                "(AutoModelForSequenceClassification, ...ForTokenClassification, ...ForCausalLM, ...ForImageClassification)."
            )
        teacher_logits = None
        if self.teacher is not None and model.training:
            with torch.no_grad():
                teacher_logits = self.teacher(**features).logits
        terms = distillation_loss(
            logits,
            labels,
            teacher_logits,
            self.args.distillation_alpha,
            self.args.distillation_temperature,
            num_items_in_batch,
            shift_labels=isinstance(self.model, RMTKDForCausalLM),
        )
        if model.training:
            self._terms["ce_loss"].append(terms.ce.detach())
            self._terms["kl_loss"].append(terms.kl.detach())
        loss = terms.loss
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
        """Adds the mean CE and KL terms since the last training log as `ce_loss` and `kl_loss`."""
        if "loss" in logs and self._terms["ce_loss"]:
            for key, values in self._terms.items():
                logs[key] = round(float(torch.stack(values).mean()), 6)
                values.clear()
        super().log(logs, start_time)

    # -- reductions -----------------------------------------------------------------------------------------
    def reduction_groups(self) -> list[list[str]]:
        """Site names per scheduled reduction, from `reduction_target_modules` and `reduction_schedule`."""
        sites = select_sites(self.model.model, self.args.reduction_target_modules)
        groups = layer_groups(sites, self.args.reduction_schedule)
        if self.args.reduction_hidden_width and self.args.reduction_schedule != "none":
            # First: every other site's recorded shapes depend on the hidden width.
            groups = [[HIDDEN_KEY]] + groups
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
        return self._freeze(wrap_existing(type(model), copy.deepcopy(model.config), copy.deepcopy(model.model)))

    def run_reduction(self, index: int, names: list[str]) -> bool:
        """Reduce one scheduled group. Returns `False` when a stop rule ends the schedule instead."""
        args, model = self.args, self.model
        params_before = model.num_parameters()
        if args.reduction_target_params is not None and params_before <= args.reduction_target_params:
            self.log({"rmtkd/stopped_at_target_params": float(params_before)})
            return False
        if args.reduction_max_metric_drop is not None:
            if self.reduction_callback.history and not self.check_metric_budget():
                return False
            self.reduction_callback.metric_before = self._metric()
        snapshot = (
            self._take_snapshot()
            if (args.distillation_teacher == "self" or args.reduction_max_metric_drop is not None)
            else None
        )
        if args.distillation_teacher == "self":
            self.teacher = snapshot
        self._snapshot = snapshot
        options = SpectralOptions(**args.spectral_options())
        calibration, progress = self._calibration_data(), self.is_world_process_zero()
        if names == [HIDDEN_KEY]:
            hidden = reduce_hidden(model, calibration, options, progress)
            report, records = SpectralReport({HIDDEN_KEY: hidden}, options, ""), [HIDDEN_KEY]
        else:
            report = analyze_sites(model.model, calibration, select_sites(model.model, names), options, progress)
            records = apply_report(model, report, args.reduction_ffn_method)
        self._after_structure_change()
        params_after = model.num_parameters()
        logs = {
            "rmtkd/reduction": float(index),
            "rmtkd/params_before": float(params_before),
            "rmtkd/params_after": float(params_after),
        }
        for name, site in report.items():
            logs.update(
                {
                    f"rmtkd/{name}/d": float(site.dim),
                    f"rmtkd/{name}/k": float(site.rank),
                    f"rmtkd/{name}/sigma2": site.sigma2,
                    f"rmtkd/{name}/lambda_plus": site.lambda_plus,
                }
            )
        self.log(logs)
        if self.is_world_process_zero():
            report.plot(Path(args.output_dir) / "spectra" / f"reduction_{index:02d}")
        self.reduction_callback.history.append(
            {
                "index": index,
                "step": self.state.global_step,
                "params_before": params_before,
                "params_after": params_after,
                "reduced": sorted(records),
                "sites": {
                    n: {"d": s.dim, "k": s.rank, "n": s.n_samples, "sigma2": s.sigma2, "lambda_plus": s.lambda_plus}
                    for n, s in report.items()
                },
            }
        )
        return True

    def _metric(self) -> float:
        metrics = self.evaluate()
        if self.args.reduction_metric not in metrics:
            raise ValueError(f"`reduction_metric`={self.args.reduction_metric!r} is not among {sorted(metrics)}.")
        return float(metrics[self.args.reduction_metric])

    def check_metric_budget(self, final: bool = False) -> bool:
        """Compare the eval metric with its value before the last reduction; undo that reduction if over budget."""
        args, callback = self.args, self.reduction_callback
        now = self._metric()
        before = callback.metric_before
        drop = (before - now) if args.reduction_metric_greater_is_better else (now - before)
        if drop <= args.reduction_max_metric_drop:
            return True
        snapshot = self._snapshot
        for parameter in snapshot.parameters():
            parameter.requires_grad_(True)
        self.model.model = snapshot.model
        self.model.config.reduced_modules = snapshot.config.reduced_modules
        self.teacher = None if args.distillation_teacher == "self" else self.teacher
        callback.history[-1]["undone"] = True
        callback.stopped = True
        if not final:
            self._after_structure_change()
        self.log({"rmtkd/undone_reduction": float(callback.history[-1]["index"]), "rmtkd/metric_drop": drop})
        return False

    def _after_structure_change(self) -> None:
        """Point the optimizer, the LR scheduler and the DDP wrapper at the new parameters."""
        self.model.model.train(self.model.training)
        if self.optimizer is None:  # reduction before the optimizer exists (e.g. at step 0 of a resumed run)
            return
        old = self.optimizer
        old_raw = getattr(old, "optimizer", old)
        self.optimizer = None
        self.create_optimizer()
        new_raw = self.optimizer
        carry_optimizer_state(old_raw, new_raw)
        if old in self.accelerator._optimizers:
            self.accelerator._optimizers.remove(old)
        self.optimizer = self.accelerator.prepare_optimizer(new_raw)
        scheduler = self.lr_scheduler
        if scheduler is not None:
            getattr(scheduler, "scheduler", scheduler).optimizer = new_raw
            if hasattr(scheduler, "optimizers"):
                scheduler.optimizers = [self.optimizer]
        if isinstance(self.model_wrapped, nn.parallel.DistributedDataParallel):
            if self.model_wrapped in self.accelerator._models:
                self.accelerator._models.remove(self.model_wrapped)
            self.model_wrapped = self.accelerator.prepare_model(self.model)
        self.callback_handler.optimizer = self.optimizer
        self.callback_handler.lr_scheduler = self.lr_scheduler

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        # The pre-reduction teacher is part of the run's state: a resumed run distils from the same one.
        if self.teacher is not None and self.args.distillation_teacher == "self" and self.is_world_process_zero():
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}" / TEACHER_DIR
            self.teacher.save_pretrained(folder)

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
            self._restore_reductions(Path(resume_from_checkpoint))
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

    def _restore_reductions(self, checkpoint: Path) -> None:
        config = json.loads((checkpoint / "config.json").read_text())
        records = config.get("reduced_modules") or {}
        new = {k: v for k, v in records.items() if k not in self.model.config.reduced_modules}
        self.model.config.reduced_modules.update(new)
        if HIDDEN_KEY in new:
            # The hidden width changes the architecture itself: rebuild the inner model from the checkpoint's config
            # (its weights are loaded by Trainer right after).
            rebuilt = type(self.model)(copy.deepcopy(self.model.config)).model
            self.model.model = rebuilt.to(self.args.device).train(self.model.training)
        else:
            apply_structure(self.model.model, new)
        self.model.config.calibration = config.get("calibration") or {}
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        exported = (state.get("stateful_callbacks") or {}).get(type(self.reduction_callback).__name__)
        if exported:
            self.reduction_callback.load_attributes(exported["attributes"])
        teacher_dir = checkpoint / TEACHER_DIR
        if self.args.distillation_teacher == "self" and teacher_dir.exists():
            self.teacher = self._freeze(type(self.model).from_pretrained(teacher_dir).to(self.args.device))
            self._snapshot = self.teacher
