"""Readers for the local data the examples and benchmarks use: labelled text tables (CSV/TSV) and CIFAR-10 splits
stored as parquet files of JPEG bytes."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def read_table(path: str, text_column: str, label_column: str) -> list[dict]:
    """Rows `{"text", "label"}` of a CSV (or a TSV: `.tsv`/`.tab`, no quoting, as GLUE writes them)."""
    delimiter = "\t" if path.endswith((".tsv", ".tab")) else ","
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(
            handle, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        )
        return [{"text": row[text_column], "label": row[label_column]} for row in reader]


class CifarImages(torch.utils.data.Dataset):
    """Decoded images `(n, 3, 32, 32)` uint8 and labels; training items get a random 4-pixel crop and a flip."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, train: bool):
        self.images, self.labels, self.train = images, labels, train
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        image = self.images[index].float() / 255.0
        if self.train:
            dy, dx = torch.randint(0, 9, (2,)).tolist()
            image = F.pad(image, (4, 4, 4, 4))[:, dy : dy + 32, dx : dx + 32]
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
        return {"pixel_values": (image - self.mean) / self.std, "labels": self.labels[index]}


def read_split(path: Path, limit: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded subset of `limit` images (all by default) of a parquet split: uint8 `(n, 3, H, W)` and labels `(n,)`."""
    import pyarrow.parquet as pq
    from PIL import Image

    table = pq.read_table(path)
    order = np.random.default_rng(seed).permutation(table.num_rows)[: limit or table.num_rows]
    column = "jpeg" if "jpeg" in table.column_names else "image"
    blobs, labels = table.column(column).to_pylist(), table.column("label").to_numpy()
    images = np.stack(
        [np.asarray(Image.open(io.BytesIO(_bytes(blobs[i]))).convert("RGB")) for i in tqdm(order, desc=path.name)]
    )
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels[order]).long()


def _bytes(blob) -> bytes:
    return blob["bytes"] if isinstance(blob, dict) else blob
