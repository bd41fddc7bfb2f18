"""sentence-transformers in and out: compress the transformer inside a `SentenceTransformer`, keep its other modules.

The `SentenceTransformer`'s `Transformer` module holds a Hugging Face model (`module.model`); it is compressed with
[`hf_rmtkd.compress`] (calibration from raw sentences, tokenized by the module's own tokenizer) and put back as the
RMTKD model. Pooling, normalisation and dense layers are untouched. `model.save(path)` then writes the RMTKD
checkpoint (with its code and tokenizer) beside `modules.json` and the other modules' folders, so
`SentenceTransformer(path)` loads the same modules after `import hf_rmtkd`, or with `trust_remote_code=True` where
hf_rmtkd is not installed.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedModel

from .compression import compress


def _require():
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as error:  # an optional dependency
        raise ImportError("pip install sentence-transformers to compress SentenceTransformer models") from error
    return SentenceTransformer


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
    sentences = [s for s in sentences if s]
    if not sentences:
        raise ValueError("`sentences` is empty: calibration needs text.")
    module = transformer_module(model)
    limit = getattr(module, "max_seq_length", None)
    batches = [
        dict(module.tokenizer(list(sentences[i : i + batch_size]), padding=True, truncation=limit is not None,
                              max_length=limit, return_tensors="pt"))
        for i in range(0, len(sentences), batch_size)
    ]  # fmt: skip
    module.model = compress(
        module.model, batches, progress=progress, processing_class=module.tokenizer, **compress_kwargs
    )
    return model
