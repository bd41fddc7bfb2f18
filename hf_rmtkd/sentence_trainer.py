"""[`RMTKDTrainer`] for a `SentenceTransformer`: scheduled reductions of its transformer, embedding self-distillation.

`RMTKDTrainer(model=sentence_transformer, ...)` builds an [`RMTKDSentenceTransformerTrainer`]. The trainer's model is
the RMTKD wrapper of the `SentenceTransformer`'s transformer (so calibration, reductions, the optimizer's rewiring,
checkpoints and resuming are those of every RMTKD run); the modules after it (pooling, dense layers, normalisation)
turn its token states into sentence embeddings and are not trained. An embedding model has no task head, so the loss
is not CE + KL on logits but

    distance(e_student, e_teacher M) + w_h * hidden + w_a * attention

with `distance` from `distillation_embedding_distance` (cosine by default), `e_teacher` the embedding of the model
as it was given (`distillation_teacher="original"`, the default here), of the model before each reduction
(`"self"`) or of an external `SentenceTransformer`, and `M` the kept basis
where the hidden width was reduced (`M = I` otherwise; a `Dense` layer after pooling is folded instead, see
[`fold_downstream`]). `eval_loss` is the same distance to the model the run started from (or the external teacher),
so `reduction_max_metric_drop` with `reduction_metric="eval_loss"` bounds how far the embeddings may move.

Data: raw sentences, as a list of strings or a `datasets.Dataset` with one text column; the model's own tokenizer
(`SentenceTransformer.preprocess`) turns them into batches ([`SentenceCollator`]). No labels are needed.
"""

from __future__ import annotations

import copy
import inspect

import torch

from .compression import to_rmtkd
from .distillation import embedding_distance
from .kept_basis import map_between
from .representation import output_flags, representation_terms
from .sentence_models import _require, downstream_modules, fold_downstream, in_student_space, transformer_module
from .trainer import RMTKDTrainer


TEXT_COLUMNS = ("sentence", "text", "anchor")


class SentenceCollator:
    """Tokenizes a batch of raw sentences with a `SentenceTransformer`'s own preprocessing.

    Args:
        sentence_model: the `SentenceTransformer` (its tokenizer, `max_seq_length` and prompts' absence apply).
        column (`str`, *optional*): the text column of dict examples; default the only string column, else the first
            of `TEXT_COLUMNS` present.
    """

    def __init__(self, sentence_model, column: str | None = None):
        self.sentence_model = sentence_model
        self.column = column

    def _text(self, example) -> str:
        if isinstance(example, str):
            return example
        if not isinstance(example, dict):
            raise TypeError(f"A SentenceTransformer trains on raw sentences; got a {type(example).__name__} example.")
        column = self.column
        if column is None:
            strings = [k for k, v in example.items() if isinstance(v, str)]
            named = [k for k in TEXT_COLUMNS if k in strings]
            if len(strings) != 1 and not named:
                raise ValueError(
                    f"Cannot tell the text column among {sorted(example)}: name it `sentence` or `text`, or pass "
                    "`data_collator=SentenceCollator(model, column=...)`."
                )
            column = strings[0] if len(strings) == 1 else named[0]
        if column not in example:
            raise ValueError(f"The examples have no column {column!r} (columns: {sorted(example)}).")
        return example[column]

    def __call__(self, examples: list) -> dict[str, torch.Tensor]:
        texts = [self._text(example) for example in examples]
        features = self.sentence_model.preprocess(texts)
        return {k: v for k, v in features.items() if isinstance(v, torch.Tensor)}


def _as_dataset(data):
    """A list of sentences becomes a one-column `datasets.Dataset` (`sentence`); anything else is returned as is."""
    if isinstance(data, (list, tuple)) and data and all(isinstance(s, str) for s in data):
        from datasets import Dataset

        return Dataset.from_dict({"sentence": list(data)})
    return data


class RMTKDSentenceTransformerTrainer(RMTKDTrainer):
    """[`RMTKDTrainer`] for a `SentenceTransformer` (built by `RMTKDTrainer(model=sentence_transformer, ...)`).

    Args:
        model: a `SentenceTransformer`, or the folder of one. It is changed in place: after training, `model.save(path)`
            (or `trainer.save_model(path)`) writes a folder `SentenceTransformer(path)` loads.
        args ([`RMTKDTrainingArguments`]): as for any RMT-KD run; `distillation_alpha` and `_temperature` do not apply
            (no logits), `distillation_embedding_distance` chooses the embedding loss.
        train_dataset / eval_dataset: raw sentences (a list of strings, or a `Dataset` with a text column).
        teacher_model (`SentenceTransformer`, *optional*): with `distillation_teacher="external"`.
        **kwargs: as for [`RMTKDTrainer`]; `data_collator` defaults to a [`SentenceCollator`].
    """

    # No labels anchor a chain of pre-reduction teachers: measured, it recovered nothing on BBC News retrieval.
    default_teacher = "original"

    def __init__(self, model=None, args=None, *pos, teacher_model=None, data_collator=None, **kwargs):
        SentenceTransformer = _require()
        if not isinstance(model, SentenceTransformer):
            model = SentenceTransformer(str(model), device="cpu")
        self.sentence_model = model
        module = transformer_module(model)
        module.model = to_rmtkd(module.model)
        self._origin_width = module.model.model.config.hidden_size
        self._origin = [copy.deepcopy(m) for m in downstream_modules(model)]
        self._downstream_cache: dict[int, list] = {}
        teacher_encoder = None
        if teacher_model is not None:
            if not isinstance(teacher_model, SentenceTransformer):
                raise TypeError("`teacher_model` must be a SentenceTransformer when the model is one.")
            teacher_encoder = transformer_module(teacher_model).model
            teacher_encoder.__dict__["rmtkd_downstream"] = downstream_modules(teacher_model)
        for key in ("train_dataset", "eval_dataset", "calibration_dataset"):
            if key in kwargs:
                kwargs[key] = _as_dataset(kwargs[key])
        super().__init__(
            module.model,
            args,
            *pos,
            teacher_model=teacher_encoder,
            data_collator=data_collator or SentenceCollator(model),
            **kwargs,
        )
        model.to(self.args.device)
        if teacher_model is not None:
            teacher_model.to(self.args.device).eval()
        self._terms = {"embedding_loss": []}
        # The distance eval_loss reports, and the teacher before the first reduction: the model as it was given.
        self.reference = self.teacher if self.teacher is not None else self._take_snapshot()

    # -- what differs from a task model -------------------------------------------------------------------
    def _validate_task(self, example) -> None:
        """Raw sentences need no labels and the transformer no task head."""

    def _remove_unused_columns(self, dataset, description=None):
        return dataset  # the text column is the input; the collator picks it

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        return data_collator

    def _get_num_items_in_batch(self, batch_samples, device):
        # Items are sentences: counted as "labels" would be, so gradient accumulation and DDP divide by the total.
        counts = [{"labels": torch.zeros(len(b["input_ids"]), dtype=torch.long)} for b in batch_samples]
        return super()._get_num_items_in_batch(counts, device)

    def _model_inputs(self, inputs: dict) -> dict:
        """The batch's tensors the transformer's `forward` takes (preprocessing may add its own bookkeeping)."""
        accepted = inspect.signature(self.model.model.forward).parameters
        return {k: v for k, v in inputs.items() if k in accepted}

    def _downstream_at(self, width: int) -> list:
        """The modules after the transformer, carried to a stream of `width` (folded from the originals)."""
        if width == self._origin_width:
            return self._origin
        if width not in self._downstream_cache:
            modules = [copy.deepcopy(m) for m in self._origin]
            fold_downstream(modules, map_between(self.model, self._origin_width, width).matrix)
            self._downstream_cache[width] = [m.to(self.args.device) for m in modules]
        return self._downstream_cache[width]

    def _sync_downstream(self) -> None:
        """Point the `SentenceTransformer`'s own modules after the transformer at the current width."""
        width = self.model.model.config.hidden_size
        modules = [copy.deepcopy(m) for m in self._downstream_at(width)]
        names = list(self.sentence_model._modules)
        start = len(names) - len(modules)
        for name, module in zip(names[start:], modules):
            self.sentence_model._modules[name] = module.to(self.args.device)

    @staticmethod
    def _embed(token_states: torch.Tensor, features: dict, modules: list) -> torch.Tensor:
        """Sentence embeddings `(batch, dim)` from token states `(batch, seq, width)` through `modules`."""
        flow = {**features, "token_embeddings": token_states}
        for module in modules:
            flow = module(flow)
        return flow["sentence_embedding"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`distance(e_s, e_t M)` summed over sentences and divided by the accumulated batch's sentence count, plus
        the weighted hidden / attention terms in training; evaluation: the distance to the reference model alone."""
        features = self._model_inputs(inputs)
        teacher = (self.teacher or self.reference) if model.training else self.reference
        flags = output_flags(self.args, self.model.model, teacher) if model.training else {}
        outputs = model(**features, **flags)
        student = self._embed(outputs.last_hidden_state, features, downstream_modules(self.sentence_model))
        with torch.no_grad():
            teacher_outputs = teacher(**features, **flags)
            states = teacher_outputs.last_hidden_state
            modules = teacher.__dict__.get("rmtkd_downstream") or self._downstream_at(states.shape[-1])
            target = self._embed(states, features, modules)
            stream = None  # a Dense layer after pooling was folded: the embeddings' widths already agree
            if target.shape[-1] != student.shape[-1]:
                stream = map_between(self.model, states.shape[-1], self.model.model.config.hidden_size)
            target = in_student_space(target, stream, student.shape[-1], self._origin)
        distance = embedding_distance(student, target, self.args.distillation_embedding_distance)
        items = num_items_in_batch if num_items_in_batch is not None else distance.shape[0]
        loss = distance.sum() / items
        if not model.training:
            return (loss, outputs) if return_outputs else loss
        terms = {"embedding": loss}
        if flags:
            labels = torch.zeros(distance.shape[0], dtype=torch.long, device=distance.device)
            mask = features.get("attention_mask")
            extra = representation_terms(flags, self.model, outputs, teacher_outputs, labels, items, mask, False)
            for name, value in extra.items():
                loss = loss + self.args.term_weight(name) * value
            terms.update(extra)
        for name, value in terms.items():
            self._terms.setdefault(f"{name}_loss", []).append(value.detach())
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The embedding distance to the reference as the loss; there are no logits or labels to return."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # -- structure changes: the modules after the transformer follow the width ----------------------------
    def run_reduction(self, index, names, steps_left=1, relaxation=0.0):
        entry = super().run_reduction(index, names, steps_left, relaxation)
        self._sync_downstream()
        return entry

    def undo_reduction(self, final=False):
        super().undo_reduction(final)
        self._downstream_cache.clear()  # a retry may reach a cached width through another basis
        self._sync_downstream()

    def _after_restore(self) -> None:
        """A resumed run: the modules after the transformer are refolded to the checkpoint's width."""
        self._downstream_cache.clear()
        self._sync_downstream()

    def _save(self, output_dir=None, state_dict=None):
        """Write the whole `SentenceTransformer` (modules.json, the RMTKD transformer with its code, pooling, ...)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        self.sentence_model.save(str(output_dir))
