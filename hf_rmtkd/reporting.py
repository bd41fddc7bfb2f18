"""Helpers for example and benchmark scripts: the accuracy metric, the machine line, results files and the resumable
JSON store of benchmark rows."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np
import torch
import transformers


def _version() -> str:
    from . import __version__

    return __version__


def accuracy(prediction) -> dict:
    """`compute_metrics` for `Trainer`: top-1 accuracy of the logits (computed here, since `evaluate.load`
    fetches its metric scripts from the Hub)."""
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def machine_line() -> str:
    """Machine, threads, accelerator and library versions, for the top of a results file."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"Machine: {platform.machine()}, {torch.get_num_threads()} CPU threads, {gpu}. Versions: torch {torch.__version__}, "
        f"transformers {transformers.__version__}, hf_rmtkd {_version()}, Python {platform.python_version()}."
    )


def write_results(path: str | None, lines: list[str]) -> None:
    """Write the results file (creating its folder) and echo it; with no path, only print it."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def report_header(title: str, rows: dict) -> list[str]:
    """The top of a benchmark's results file from its JSON store: title, machine, every command run, setup."""
    return [
        f"# {title}",
        "",
        rows.get("_machine", machine_line()),
        "",
        "Commands: " + "; ".join(f"`python {c}`" for c in rows.get("_runs", [])),
        "",
        rows.get("_setup", ""),
    ]


def open_store(output_dir: str) -> tuple[Path, dict]:
    """The benchmark's JSON store `<output_dir>/results.json` (folder created) and the rows it holds so far."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "results.json"
    return store, (json.loads(store.read_text()) if store.exists() else {})


def update_store(store: Path, entries: dict, command: str | None = None) -> dict:
    """Merge `entries` (top-level keys replaced) into the JSON store as it is on disk now and return the merged rows.

    Several invocations may share one store (two recipes running side by side on two cores): each re-reads the file
    under an exclusive lock (`<store>.lock`, POSIX only; elsewhere unlocked) and replaces it atomically, so a row one
    process wrote is never overwritten by another's stale copy. `command`, if given, is appended to `_runs`.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; the atomic replace still keeps the file whole
        fcntl = None
    with open(store.with_name(store.name + ".lock"), "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        rows = json.loads(store.read_text()) if store.exists() else {}
        rows.update(entries)
        if command is not None:
            rows.setdefault("_runs", []).append(command)
        partial = store.with_name(f"{store.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps(rows, indent=1))
        os.replace(partial, store)
    return rows


def publish(store: Path, rows: dict, lines: list[str], results_file: str | None) -> None:
    """Save the JSON store, then write the markdown `lines` to `results_file` (or print them)."""
    store.write_text(json.dumps(rows, indent=1))
    write_results(results_file, lines)
