"""sentence-transformers in and out: compress the transformer inside a `SentenceTransformer`, keep its other modules.

The `SentenceTransformer`'s `Transformer` module holds a Hugging Face model (`module.model`); it is compressed with
[`hf_rmtkd.compress`] (calibration from raw sentences, tokenized by the module's own tokenizer) and put back as the
RMTKD model. Pooling, normalisation and dense layers are untouched. `model.save(path)` then writes the RMTKD
checkpoint (with its code and tokenizer) beside `modules.json` and the other modules' folders, so
`SentenceTransformer(path)` loads the same modules after `import hf_rmtkd`, or with `trust_remote_code=True` where
hf_rmtkd is not installed.

Recovery after `compress` ([`distill_sentence_transformer`]) goes through sentence-transformers' own
`SentenceTransformerTrainer` with its `EmbedDistillLoss` (the teacher's sentence embeddings as labels, computed once):
its raw-text columns, evaluators and save format apply unchanged. Compression *while* training is
[`RMTKDTrainer`] given the `SentenceTransformer` ([`hf_rmtkd.sentence_trainer`]). In both, RMT-KD adds the target:
where the hidden width was reduced, the teacher's embedding is taken through the kept basis (`e_teacher @ M`,
renormalised when the model normalises), so the student is pulled towards the subspace the reduction kept instead of
through a learned projection; a `Dense` layer after pooling is folded instead ([`fold_downstream`]).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel

from .compression import compress
from .distillation import EMBEDDING_DISTANCES as DISTANCES
from .kept_basis import map_from


def _require():
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as error:  # an optional dependency
        raise ImportError("pip install sentence-transformers to compress SentenceTransformer models") from error
    return SentenceTransformer


def is_sentence_transformer(model) -> bool:
    """Whether `model` is a `SentenceTransformer`, or a folder holding one (a `modules.json`)."""
    if isinstance(model, (str, Path)):
        return (Path(model) / "modules.json").is_file()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return False
    return isinstance(model, SentenceTransformer)


def transformer_module(model):
    """The module of a `SentenceTransformer` that holds the Hugging Face model (`.model`), e.g. `Transformer`."""
    for module in model:
        if isinstance(getattr(module, "model", None), PreTrainedModel) and hasattr(module, "tokenizer"):
            return module
    raise TypeError(
        f"No module of this SentenceTransformer holds a transformers model: {[type(m).__name__ for m in model]}."
    )


def compress_sentence_transformer(
    model, sentences: Sequence[str], batch_size: int = 32, progress: bool = True, **compress_kwargs
):
    """Compress the transformer of a `SentenceTransformer` (or of the folder or Hub id of one) in place.

    Args:
        model: a `sentence_transformers.SentenceTransformer`, or a path / id to load one from.
        sentences: raw calibration sentences (the model's tokenizer and `max_seq_length` apply).
        batch_size: sentences per calibration forward pass.
        **compress_kwargs: as for [`hf_rmtkd.compress`] (`target_modules`, `hidden_width`, spectral options).

    Returns:
        The `SentenceTransformer`, its transformer now an `RMTKDModel`; `save(path)` writes a folder that
        `SentenceTransformer(path)` loads with the same modules.
    """
    SentenceTransformer = _require()
    if not isinstance(model, SentenceTransformer):
        model = SentenceTransformer(str(model), device="cpu")
    sentences = _texts(sentences, "sentences")
    module = transformer_module(model)
    width = module.model.config.hidden_size
    limit = getattr(module, "max_seq_length", None)
    batches = [
        dict(module.tokenizer(list(sentences[i : i + batch_size]), padding=True, truncation=limit is not None,
                              max_length=limit, return_tensors="pt"))
        for i in range(0, len(sentences), batch_size)
    ]  # fmt: skip
    result = compress(module.model, batches, progress=progress, processing_class=module.tokenizer, **compress_kwargs)
    module.model, report = result if compress_kwargs.get("return_report") else (result, None)
    if module.model.model.config.hidden_size != width:
        fold_downstream(downstream_modules(model), map_from(module.model, width).matrix)
    return (model, report) if report is not None else model


def downstream_modules(model) -> list:
    """The modules of a `SentenceTransformer` after its transformer (pooling, dense layers, normalisation)."""
    modules = list(model)
    return modules[modules.index(transformer_module(model)) + 1 :]


def fold_downstream(modules: list, matrix: torch.Tensor) -> None:
    """Carry a hidden-width reduction through the modules after the transformer, in place.

    The token embeddings now live in the kept basis: `z ~ h @ matrix`, `matrix` of shape `(old_width, new_width)`.
    Pooling is told its new width (so `get_embedding_dimension()` and the saved configs are right); the first `Dense`
    layer, which read `old_width`-wide (or, after concatenated pooling modes, a multiple) sentence embeddings, gets
    `W @ matrix` as its weight, so its output keeps its width and meaning (exact on the kept subspace). Parameter-free
    modules (normalisation, dropout) need nothing.

    Raises:
        `NotImplementedError` for a module with parameters before the first `Dense` (e.g. a `LayerNorm` module), or a
        residual `Dense`: the reduced width cannot be carried through them.
    """
    old, new = matrix.shape
    for module in modules:
        kind = type(module).__name__
        if getattr(module, "embedding_dimension", None) == old:
            module.embedding_dimension = new
            if hasattr(module, "pooling_output_dimension"):
                module.pooling_output_dimension = module.pooling_output_dimension // old * new
        elif kind == "Dense" and not getattr(module, "use_residual", False) and module.in_features % old == 0:
            linear = module.linear
            block = torch.block_diag(*[matrix] * (module.in_features // old)).to(linear.weight)
            folded = torch.nn.Linear(block.shape[1], linear.out_features, bias=linear.bias is not None)
            folded.to(linear.weight)
            with torch.no_grad():
                folded.weight.copy_(linear.weight @ block)
                if linear.bias is not None:
                    folded.bias.copy_(linear.bias)
            module.linear, module.in_features = folded, block.shape[1]
            return  # its output has its own width: the modules after it are unchanged
        elif any(True for _ in module.parameters()):
            raise NotImplementedError(
                f"A {kind} module after the transformer reads the {old}-wide embeddings; a hidden-width reduction "
                f"to {new} cannot be carried through it. Compress without hidden_width."
            )


def _texts(sentences: Sequence[str], name: str) -> list[str]:
    """The non-empty strings of `sentences`; `TypeError` for anything but raw sentences, `ValueError` for none."""
    if isinstance(sentences, str) or not all(isinstance(s, str) for s in sentences):
        raise TypeError(f"`{name}`: a SentenceTransformer takes raw sentences, pass a list of strings.")
    texts = [s for s in sentences if s]
    if not texts:
        raise ValueError(f"`{name}` is empty: there is no text to calibrate or distill on.")
    return texts


def embedding_targets(teacher, student, sentences: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """The teacher's sentence embeddings in the student's embedding space, shape `(len(sentences), student_dim)`.

    Same width: the teacher's embeddings as they are. Reduced hidden width: `e_teacher @ M`, with `M` of shape
    `(teacher_dim, student_dim)` the composed kept basis recorded on the student's transformer by the reduction
    (exact for mean or CLS pooling, which are linear), renormalised when the student ends with `Normalize`.

    Raises:
        `ValueError` when the widths differ and no recorded reduction maps one to the other (e.g. a student loaded
        from disk, where the kept basis is not saved: compute the targets before saving, or distill first).
    """
    texts = _texts(sentences, "sentences")
    encode = dict(batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
    target = teacher.encode(texts, **encode).float().cpu()
    width = student.get_embedding_dimension()
    stream = None if target.shape[1] == width else map_from(transformer_module(student).model, target.shape[1])
    hint = "; distill a student compressed in this process (its kept basis is not saved with the weights)"
    return in_student_space(target, stream, width, list(student), hint)


def in_student_space(target: torch.Tensor, stream, width: int, modules: Sequence, hint: str = "") -> torch.Tensor:
    """Teacher embeddings `(n, d_teacher)` in a student's embedding space `(n, width)`: as they are at the same width,
    else `target @ M` through the kept basis `stream` (a [`~hf_rmtkd.kept_basis.StreamMap`] or `None`), renormalised
    when `modules` (the student's) include `Normalize`.

    Raises:
        `ValueError` when the widths differ and `stream` does not map one to the other (`hint` is appended).
    """
    if target.shape[-1] == width:
        return target
    if stream is None or stream.out_width != width:
        raise ValueError(
            f"The teacher's embeddings have {target.shape[-1]} dimensions and the student's {width}, and the student "
            f"records no hidden-width reduction between them{hint}."
        )
    target = target.float() @ stream.matrix.to(target.device)
    if any(type(module).__name__ == "Normalize" for module in modules):
        target = torch.nn.functional.normalize(target, dim=-1)
    return target


def distill_sentence_transformer(
    student,
    teacher,
    sentences: Sequence[str],
    args=None,
    distance: str = "cosine",
    eval_sentences: Sequence[str] | None = None,
    batch_size: int = 64,
):
    """Recover a compressed `SentenceTransformer` by distilling the teacher's sentence embeddings into it.

    Trains `student` in place with sentence-transformers' `SentenceTransformerTrainer` and `EmbedDistillLoss`
    (labels: [`embedding_targets`], computed once up front). Cost: one teacher forward per sentence, then the epochs
    of `args` over `sentences` (one student forward and backward per sentence and epoch).

    Args:
        student: the compressed `SentenceTransformer` (from [`compress_sentence_transformer`], in this process when
            its hidden width was reduced).
        teacher: the `SentenceTransformer` before compression (frozen; only its embeddings are used).
        sentences: raw training sentences, ideally from the domain the model serves (no labels needed).
        args (`SentenceTransformerTrainingArguments`, *optional*): default one epoch, batch 32, lr 5e-5 (10% warmup), no
            checkpoints, under `rmtkd_st_distill/`.
        distance (`str`, *optional*, defaults to `"cosine"`): `"cosine"` (1 - cosine, sentence-transformers' default
            for `EmbedDistillLoss`), `"mse"` (its `MSELoss`, the multilingual-distillation recipe) or `"l2"`.
        eval_sentences: held-out sentences; the same loss is then reported as `eval_loss` at each evaluation.
        batch_size: sentences per teacher forward when computing the targets.

    Returns:
        The trained `student` (the same object); `student.save(path)` writes a folder `SentenceTransformer(path)` loads.
    """
    _require()
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import EmbedDistillLoss

    if distance not in DISTANCES:
        raise ValueError(f"`distance` must be one of {DISTANCES}, got {distance!r}.")
    texts = _texts(sentences, "sentences")
    train = Dataset.from_dict(
        {"sentence": texts, "label": embedding_targets(teacher, student, texts, batch_size).numpy()}
    )
    evaluation = None
    if eval_sentences is not None:
        held_out = _texts(eval_sentences, "eval_sentences")
        targets = embedding_targets(teacher, student, held_out, batch_size).numpy()
        evaluation = Dataset.from_dict({"sentence": held_out, "label": targets})
    if args is None:
        args = SentenceTransformerTrainingArguments(
            output_dir="rmtkd_st_distill", num_train_epochs=1, per_device_train_batch_size=32, learning_rate=5e-5,
            warmup_steps=0.1, save_strategy="no", report_to="none", logging_steps=50,
        )  # fmt: skip
    trainer = SentenceTransformerTrainer(
        model=student,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        loss=EmbedDistillLoss(student, distance_metric=distance),
    )
    trainer.train()
    return student
