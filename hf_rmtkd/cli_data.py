"""Calibration batches from files, for the `rmtkd` command line: text through the model's tokenizer, images through
its image processor.

Files: CSV, TSV, JSON lines, plain text or parquet, a `datasets` folder written by `save_to_disk`, or (images) a
folder of image files as `datasets`' `imagefolder` reads it. A model whose `main_input_name` is `pixel_values` gets
images; every other model gets text.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import torch


# File suffix -> (`datasets` builder, its options).
_BUILDERS = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".txt": ("text", {}),
    ".parquet": ("parquet", {}),
}
# Column names tried first for images, before any column of the `datasets.Image` type.
IMAGE_COLUMNS = ("image", "img", "jpeg")


@dataclass
class DataArguments:
    """Where the calibration data comes from and how it is batched."""

    data: str = field(
        metadata={
            "help": "CSV, TSV, JSON lines (.jsonl/.json), text or parquet file, a datasets folder, or (images) a "
            "folder of image files."
        }
    )
    text_column: str | None = field(
        default=None,
        metadata={"help": "Column holding the text; default 'text', 'sentence', or the first string column."},
    )
    image_column: str | None = field(
        default=None,
        metadata={
            "help": "Column holding the images (an Image feature or encoded bytes) for a model that takes "
            "pixel_values; default 'image', 'img', 'jpeg', or the first Image column."
        },
    )
    samples: int = field(default=512, metadata={"help": "Rows used for calibration (the first ones), >= 1."})
    max_length: int = field(
        default=128,
        metadata={"help": "Tokens per row (longer rows are truncated), >= 2; a SentenceTransformer keeps its own."},
    )
    batch_size: int = field(default=16, metadata={"help": "Rows per forward pass, >= 1."})

    def __post_init__(self):
        for name, low in (("samples", 1), ("max_length", 2), ("batch_size", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"`{name}` must be >= {low}, got {getattr(self, name)}.")
        if not Path(self.data).exists():
            raise ValueError(f"`data` {self.data!r} does not exist.")


def read_rows(args: DataArguments):
    """`args.data` as one `datasets.Dataset` (the first split of a `DatasetDict`)."""
    import datasets

    path = Path(args.data)
    if path.is_dir():
        saved = any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json"))
        if saved:
            dataset = datasets.load_from_disk(str(path))
        else:
            dataset = datasets.load_dataset("imagefolder", data_dir=str(path))
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[next(iter(dataset))]
        return dataset
    suffix = path.suffix.lower()
    if suffix not in _BUILDERS:
        raise ValueError(f"`data` {args.data!r}: unsupported file type {suffix!r}; use {', '.join(_BUILDERS)}.")
    builder, extra = _BUILDERS[suffix]
    return datasets.load_dataset(builder, data_files=str(path), split="train", **extra)


def read_texts(args: DataArguments) -> list[str]:
    """The first `args.samples` texts of `args.data` (see [`DataArguments`])."""
    dataset = read_rows(args)
    columns = dataset.column_names
    column = args.text_column or next(
        (c for c in ("text", "sentence") if c in columns),
        next((c for c in columns if getattr(dataset.features[c], "dtype", None) == "string"), None),
    )
    if column not in columns:
        raise ValueError(f"`text_column` {column!r} is not among the data's columns {columns}.")
    texts = [t for t in dataset.select(range(min(args.samples, len(dataset))))[column] if t]
    if not texts:
        raise ValueError(f"`data` {args.data!r} has no text in column {column!r}.")
    return texts


def batches(tokenizer, texts: list[str], args: DataArguments) -> list[dict[str, torch.Tensor]]:
    """Tokenized calibration batches (padded per batch, with attention masks so padding is left out)."""
    return [
        dict(tokenizer(texts[i : i + args.batch_size], padding=True, truncation=True, max_length=args.max_length,
                       return_tensors="pt"))
        for i in range(0, len(texts), args.batch_size)
    ]  # fmt: skip


def read_images(args: DataArguments) -> list:
    """The first `args.samples` images of `args.data` as RGB `PIL.Image`s (see [`DataArguments`])."""
    import datasets
    from PIL import Image

    dataset = read_rows(args)
    columns = dataset.column_names
    column = args.image_column or next(
        (c for c in IMAGE_COLUMNS if c in columns),
        next((c for c in columns if isinstance(dataset.features[c], datasets.Image)), None),
    )
    if column not in columns:
        raise ValueError(f"`image_column` {column!r} is not among the data's columns {columns}.")
    images = []
    for value in dataset.select(range(min(args.samples, len(dataset))))[column]:
        if isinstance(value, dict):  # an undecoded Image feature, or a parquet struct of bytes and path
            value = value.get("bytes")
        if isinstance(value, (bytes, bytearray)):
            value = Image.open(io.BytesIO(value))
        if not isinstance(value, Image.Image):
            raise ValueError(
                f"`image_column` {column!r} holds {type(value).__name__} values, not images (an Image feature or "
                "encoded image bytes)."
            )
        images.append(value.convert("RGB"))
    return images


def image_processor(model_path: str, config):
    """The model's image processor, or (where it saved none) a normaliser built from `config.image_mean`,
    `config.image_std` and `config.image_size` that takes images of exactly that size.

    Returns:
        `(process, processor)`: `process(images) -> pixel_values` of shape `(n, 3, H, W)`, and the processor to save
        beside a compressed model (`None` for the fallback).

    Raises:
        `ValueError` if neither a processor nor the config's normalisation is there, or if the folder's
        `preprocessor_config.json` does not load (falling back would calibrate on pixels the model never saw).
    """
    from transformers import AutoImageProcessor

    saved = Path(model_path) / "preprocessor_config.json"
    processor = None
    if saved.is_file():
        try:
            processor = AutoImageProcessor.from_pretrained(model_path)
        except (OSError, ValueError) as error:
            first = str(error).split(". ")[0][:300]
            raise ValueError(
                f"MODEL {model_path!r} has a preprocessor_config.json that does not load ({first}); fix or remove it."
            ) from error
    elif not Path(model_path).is_dir():
        # A Hub id: the processor is found where the model's weights were; a repository without one has none.
        try:
            processor = AutoImageProcessor.from_pretrained(model_path)
        except OSError:
            processor = None
    if processor is not None:
        return (lambda images: processor(images=images, return_tensors="pt")["pixel_values"]), processor
    mean, std, size = (getattr(config, k, None) for k in ("image_mean", "image_std", "image_size"))
    if mean is None or std is None or size is None:
        raise ValueError(
            f"MODEL {model_path!r} has no image processor (preprocessor_config.json) and its config no "
            "image_mean/image_std/image_size: save the processor the model was trained with into its folder."
        )
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def process(images):
        tensors = []
        for image in images:
            if image.size != (size, size):
                raise ValueError(
                    f"Image of size {image.size[0]} x {image.size[1]}, but MODEL {model_path!r} has no image "
                    f"processor to resize it: its config's image_size is {size} x {size}."
                )
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
            tensors.append((pixels.permute(2, 0, 1).float() / 255 - mean) / std)
        return torch.stack(tensors)

    return process, None


def image_batches(process, images: list, args: DataArguments) -> list[dict[str, torch.Tensor]]:
    """Calibration batches `{"pixel_values": (batch, 3, H, W)}` of `args.batch_size` images."""
    return [{"pixel_values": process(images[i : i + args.batch_size])} for i in range(0, len(images), args.batch_size)]
