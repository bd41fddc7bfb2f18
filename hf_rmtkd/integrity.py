"""Checkpoint integrity: the sha256 of the saved weights, and weights that must fit the ranks in the config.

Copied next to every saved checkpoint with `modeling_rmtkd.py` (it imports this file): keep the imports to the
standard library, torch, transformers and the other travelling files.

The hash covers every tensor of the safetensors file(s), in sorted key order: its name, dtype, shape and raw data
bytes, read from the files as written (memory-mapped, never copied), so it is independent of the sharding and of
the dtype a checkpoint is later loaded in. It is stored in `RMTKDConfig.weights_sha256` and checked by
`from_pretrained`; checkpoints without it (older ones) load without the check.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
from pathlib import Path

from transformers.utils import cached_file


WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def add_variant(name: str, variant: str | None) -> str:
    """`model.safetensors` -> `model.<variant>.safetensors`, as transformers names the files of a `variant`."""
    if not variant:
        return name
    parts = name.split(".")
    return ".".join([*parts[:-1], variant, parts[-1]])


def _shard_names(index_path: str | Path) -> list[str]:
    return sorted(set(json.loads(Path(index_path).read_text())["weight_map"].values()))


def weight_files(source, variant: str | None = None, subfolder: str = "", **hub_kwargs) -> list[Path]:
    """The safetensors files of a checkpoint: a local folder, or a Hub repo already in the local cache.

    Args:
        source (`str` or `os.PathLike`): folder or repo id, as given to `from_pretrained`.
        variant (`str`, *optional*): the weights variant.
        subfolder (`str`, *optional*): subfolder of the checkpoint.
        **hub_kwargs: `revision`, `cache_dir`, `token` for a repo id (the files are looked up in the cache only).

    Returns:
        The files (one, or every shard of the index), empty if there are none.
    """
    single, index = add_variant(WEIGHTS_NAME, variant), add_variant(WEIGHTS_INDEX_NAME, variant)
    folder = Path(source) / subfolder
    if folder.is_dir():
        if (folder / index).is_file():
            return [folder / name for name in _shard_names(folder / index)]
        return [folder / single] if (folder / single).is_file() else []
    # A repo id: from_pretrained has just downloaded the files; look them up in the cache, without the network.
    lookup = {**hub_kwargs, "subfolder": subfolder, "local_files_only": True}
    found = cached_file(source, index, _raise_exceptions_for_missing_entries=False, **lookup)
    if found:
        return [Path(cached_file(source, name, **lookup)) for name in _shard_names(found)]
    found = cached_file(source, single, _raise_exceptions_for_missing_entries=False, **lookup)
    return [Path(found)] if found else []


def safetensors_sha256(files: list[Path]) -> str:
    """sha256 over every tensor of the safetensors `files`, in sorted key order (name, dtype, shape, data bytes).

    Returns:
        The hex digest (64 characters).
    """
    entries, maps = [], []
    try:
        for path in files:
            with open(path, "rb") as handle:
                buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            maps.append(buffer)
            (length,) = struct.unpack("<Q", buffer[:8])
            header = json.loads(bytes(buffer[8 : 8 + length]))
            header.pop("__metadata__", None)
            for key, info in header.items():
                start, end = info["data_offsets"]
                entries.append((key, info["dtype"], info["shape"], buffer, 8 + length + start, 8 + length + end))
        digest = hashlib.sha256()
        for key, dtype, shape, buffer, start, end in sorted(entries, key=lambda entry: entry[0]):
            digest.update(f"{key}\0{dtype}\0{shape}\0".encode())
            with memoryview(buffer) as view:
                digest.update(view[start:end])
        return digest.hexdigest()
    finally:
        for buffer in maps:
            buffer.close()


def verify_weights(expected: str | None, source, variant: str | None = None, subfolder: str = "", **hub_kwargs):
    """Check the checkpoint's weight files against `expected` (its config's `weights_sha256`; `None` skips).

    Raises:
        `ValueError` naming the file(s) if the hash differs or the files cannot be found.
    """
    if not expected:
        return
    files = weight_files(source, variant, subfolder, **hub_kwargs)
    if not files:
        raise ValueError(
            f"Checkpoint {str(source)!r} records a weights sha256 but has no {add_variant(WEIGHTS_NAME, variant)} "
            "(or index) to check it against."
        )
    actual = safetensors_sha256(files)
    if actual != expected:
        names = ", ".join(path.name for path in files)
        raise ValueError(
            f"Checkpoint {str(source)!r}: the weights in {names} do not match the sha256 recorded in its config.json "
            f"(recorded {expected[:16]}..., found {actual[:16]}...): the file is corrupt or was changed after saving. "
            "Copy or download the checkpoint again."
        )


def _module_of(key: str) -> str:
    """Module path of a parameter key, without the wrapper's `model.` prefix."""
    path = key.rsplit(".", 1)[0]
    return path[len("model.") :] if path.startswith("model.") else path


def _owning_record(config, module: str) -> str | None:
    """The `reduced_modules` entry a module belongs to (the site itself, a part of it, or one of its producers)."""
    for path, record in config.reduced_modules.items():
        for owned in (path, *getattr(record, "producers", [])):
            if module == owned or module.startswith(owned + "."):
                return path
    return None


def raise_on_bad_weights(model, info: dict, source) -> None:
    """Refuse a checkpoint whose tensors do not fit the shapes its config implies."""
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda item: item[0])
    if mismatched:
        key, saved, expected = mismatched[0]
        module = _module_of(key)
        owner = _owning_record(model.config, module)
        recorded = f" (recorded rank {model.config.reduced_modules[owner].rank})" if owner else ""
        raise ValueError(
            f"Checkpoint {str(source)!r} does not match its recorded ranks: reduced module {owner or module!r}{recorded}: "
            f"tensor {key[len('model.') :]!r} has shape {tuple(saved)} in the checkpoint but {tuple(expected)} from the "
            f"config ({len(mismatched)} mismatched tensor(s) in all)."
        )
    missing = [k for k in info.get("missing_keys") or [] if k not in model.all_tied_weights_keys]
    if missing:
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        shown = ", ".join(f"{_module_of(k)} ({k.rsplit('.', 1)[-1]} {expected.get(k)})" for k in sorted(missing)[:5])
        raise ValueError(
            f"Checkpoint {str(source)!r} lacks weights the config's ranks require: {shown}"
            f"{' ...' if len(missing) > 5 else ''}; refusing to return re-initialised layers."
        )
    reduced = tuple(model.config.reduced_modules)
    unexpected = [k for k in info.get("unexpected_keys") or [] if _module_of(k).startswith(reduced)]
    if unexpected:
        raise ValueError(
            f"Checkpoint {str(source)!r} holds tensors {sorted(unexpected)[:5]} that the reduced modules recorded in "
            "its config do not have; the weights do not match the recorded ranks."
        )
