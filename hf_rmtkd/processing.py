"""The tokenizer or processor that belongs with a model: found beside the folder it was loaded from."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn


logger = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def find_processing_class(model: nn.Module):
    """The tokenizer (or processor) saved in the local folder `model` was loaded from, or `None`.

    The folder is `model.name_or_path` or `model.config._name_or_path`; a Hub id, a missing folder, a folder without
    tokenizer or processor files, or files that do not load give `None` (the model simply has none to save).
    """
    config = getattr(model, "config", None)
    for source in (getattr(model, "name_or_path", None), getattr(config, "_name_or_path", None)):
        if not source or not isinstance(source, (str, Path)) or not Path(source).is_dir():
            continue
        folder = Path(source)
        try:
            if any((folder / name).is_file() for name in PROCESSOR_FILES):
                from transformers import AutoProcessor

                return AutoProcessor.from_pretrained(folder, local_files_only=True)
            if any((folder / name).is_file() for name in TOKENIZER_FILES):
                from transformers import AutoTokenizer

                return AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as error:  # a broken or partial tokenizer folder must not stop the compression
            logger.info("No tokenizer or processor loaded from %s: %s", folder, error)
            return None
    return None
