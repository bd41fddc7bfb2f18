"""The kept basis of hidden-width reductions, held where training code can reach it (never in the checkpoint weights).

A hidden-width reduction maps the teacher's residual stream `h` (width `d`) to the student's, `z ~ h M`, with `M`
of shape `(d, k)`: the kept eigenvectors `Q` for RMSNorm decoders, the coordinate- and mean-aligned `Q` the slicer
used for post-LN encoders, `C Q` (centring first) for GPT-2. Representation distillation compares `z` with `h M`.
Several reductions (progressive width) compose: `M = M_1 M_2 ...`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


MAPS_FILE = "rmtkd_stream_maps.safetensors"


@dataclass
class StreamMap:
    """One hidden-width reduction's map of the stream.

    Attributes:
        matrix (`torch.Tensor` of shape `(in_width, out_width)`, float32, CPU): `z ~ h @ matrix`.
        compare_final (`bool`): whether the last entry of `hidden_states` (the final state) is also mapped by
            `matrix`. `False` for pre-norm decoders, whose last hidden state is the final norm's output.
    """

    matrix: torch.Tensor
    compare_final: bool = True

    def __post_init__(self):
        if self.matrix.dim() != 2 or self.matrix.shape[1] > self.matrix.shape[0]:
            raise ValueError(
                f"`matrix` must have shape (in_width, out_width <= in_width), got {tuple(self.matrix.shape)}."
            )
        self.matrix = self.matrix.detach().to("cpu", torch.float32)

    @property
    def in_width(self) -> int:
        return self.matrix.shape[0]

    @property
    def out_width(self) -> int:
        return self.matrix.shape[1]


def stream_maps(model) -> list[StreamMap]:
    """The stream maps recorded on an RMTKD model, oldest first (an empty list if none)."""
    return model.__dict__.setdefault("rmtkd_stream_maps", [])


def add_stream_map(model, stream_map: StreamMap) -> None:
    """Record a new hidden-width reduction's map on the RMTKD model `model`."""
    maps = stream_maps(model)
    if maps and maps[-1].out_width != stream_map.in_width:
        raise ValueError(f"A stream map from width {stream_map.in_width} cannot follow one to {maps[-1].out_width}.")
    maps.append(stream_map)


def map_between(model, start: int, end: int) -> StreamMap | None:
    """The composed map of `model`'s recorded reductions from a stream of width `start` to one of width `end`.

    Returns:
        `None` when `start == end`; else a [`StreamMap`] of shape `(start, end)`.

    Raises:
        `ValueError` if no recorded chain of reductions leads from `start` to `end`.
    """
    if start == end:
        return None
    maps = stream_maps(model)
    for first, stream_map in enumerate(maps):
        if stream_map.in_width != start:
            continue
        matrix, final = stream_map.matrix, stream_map.compare_final
        for later in maps[first + 1 :]:
            if matrix.shape[1] == end:
                break
            matrix, final = matrix @ later.matrix, final and later.compare_final
        if matrix.shape[1] == end:
            return StreamMap(matrix, final)
    chain = " -> ".join(str(m.in_width) for m in maps) + (f" -> {maps[-1].out_width}" if maps else "(none)")
    raise ValueError(
        f"No recorded hidden-width reductions lead from width {start} to {end} (no map between them): the model's "
        f"go {chain}."
    )


def map_from(model, width: int) -> StreamMap | None:
    """The composed map from a stream of `width` (a teacher's) to `model`'s current stream ([`map_between`] ending at
    the current width).

    Returns:
        `None` when `width` is the model's current width or nothing was recorded (states compare directly); a
        [`StreamMap`] otherwise.

    Raises:
        `ValueError` if no recorded chain of reductions starts at `width`.
    """
    maps = stream_maps(model)
    if not maps:
        return None
    return map_between(model, width, maps[-1].out_width)


def save_stream_maps(model, folder: str | Path) -> None:
    """Write the recorded maps next to a checkpoint (safetensors; nothing if there are none)."""
    from safetensors.torch import save_file

    maps = stream_maps(model)
    if maps:
        tensors = {f"map.{i}": m.matrix.contiguous() for i, m in enumerate(maps)}
        finals = ",".join(str(int(m.compare_final)) for m in maps)
        save_file(tensors, str(Path(folder) / MAPS_FILE), metadata={"compare_final": finals})


def load_stream_maps(model, folder: str | Path) -> bool:
    """Restore the maps saved by [`save_stream_maps`] onto `model`. Returns whether a file was found."""
    from safetensors import safe_open

    path = Path(folder) / MAPS_FILE
    if not path.exists():
        return False
    with safe_open(str(path), framework="pt") as handle:
        finals = handle.metadata()["compare_final"].split(",")
        maps = [StreamMap(handle.get_tensor(f"map.{i}"), final == "1") for i, final in enumerate(finals)]
    model.__dict__["rmtkd_stream_maps"] = maps
    return True
