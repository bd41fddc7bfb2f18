"""Recovery at high compression on the full SST-2 training set (or CIFAR-10): which distillation recipe holds accuracy.

One teacher (all-MiniLM-L6-v2 fine-tuned on all 67,349 sentences, saved under `<output_dir>/teacher` and reused by
every later invocation), then one row per recipe and seed, each measured against that teacher on the full dev set
(accuracy, parameters, size, FLOPs, CPU latency at batch 1 and 32, timed in turn with the teacher). Rows accumulate in
`<output_dir>/results.json`: a recipe already there is skipped, so the script is resumable and recipes can run in
separate invocations (`--recipes`, `--seeds`); a baseline is one row per seed and `--match` row, so baselines matched
to several rows share the store. Batches are length-grouped (`train_sampling_strategy="group_by_length"`) and
dynamically padded, which is what makes a full epoch fit a 2-core CPU (the teacher's epoch time is recorded). A row
killed mid-training resumes from the last `checkpoint-<step>` in its folder (every `--save_steps`, 500 by default;
removed once the row is stored) when the same invocation runs again; its minutes then count the resumed part.

Recipes (all on top of `RMTKDTrainer`'s defaults, hidden width included except the `rmtkd*` ones):

* `rmtkd`: the library's defaults (FFN and attention sites, layer by layer, no hidden width);
* `hidden_logits`: + hidden width, logits-only distillation (the loss before representation distillation);
* `hidden_hid`: + `distillation_hidden_weight` (hidden states through the kept basis);
* `hidden_att`: + `distillation_attention_weight` (attention distributions);
* `hidden_both`: both terms;
* `hidden_emb`: both terms, and the token table factorised as the last scheduled reduction
  (`reduction_embeddings=True`: at width 144 the table is 76% of the model); `hidden_emb_b10` / `_b15` / `_b20`: the
  same with every site's rank raised to a relative output error of at most 0.1 / 0.15 / 0.2 (`reduction_max_output_error`);
* `hidden_prog`: both terms and the width reached in `reduction_hidden_steps=3` geometric steps;
* `hidden_front` / `hidden_emb_front` (`_b12` / `_b9`: budget 0.12 / 0.09): `hidden_both` / `hidden_emb` with every reduction done before training
  (`reduction_schedule="all_at_once"`, `reduction_recovery_steps=1`) and the whole budget distilled from the
  fine-tuned teacher (`distillation_teacher="original"`): the dense student's schedule and teacher, RMT-KD's ranks;
* `rmtkd_hid` / `rmtkd_front` (`_b30`: budget 0.3): the defaults (no hidden width) with the hidden-state term, layer by layer / with
  every reduction first and the original teacher; the recipes for a CNN, whose hidden term compares block outputs
  (feature maps, channels unchanged by the reductions, so no map is needed); `rmtkd_front_s23`: `rmtkd_front` with
  the first ResNet stage kept whole (`reduction_target_modules` on stages 2 and 3), near `_b30`'s size
  (`_s23_logits`: the same, logits only).
* `dense_student`: what a user would otherwise do: a model of the same depth and the same stream width as the
  `--match` row (the teacher's top principal directions, sliced the same way), every FFN inner width the same and
  chosen to match that row's parameter count (neuron selection), attention heads kept; then distilled from the teacher
  with the `--match` recipe's losses and budget (no spectral reductions);
* `svd`: truncated SVD of the teacher's weights at the `--match` row's per-module ranks (a row without the hidden width:
  SVD cannot narrow the embeddings), then distilled the same way;
* `svd_size`: every linear layer and the token table (a CNN: every convolution but the stem) truncated by SVD to one
  shared fraction of its parameters, the one that lands on the `--match` row's whole-model count (any row, hidden
  width and token table included; `--match_params` gives that count for a row of another store), then distilled the
  same way: SVD with its own rank allocation, where `svd` borrows RMT-KD's;
* `layer_drop`: evenly spaced layers of the teacher kept, as many as fit the `--match` row's parameter count, then
  distilled the same way. (Activation PCA at matched per-site ranks is RMT-KD's own projection without the MP rule,
  so it has no row of its own.)

ResNet-56 on CIFAR-10 (`--task cifar10 --checkpoint <akamaster resnet56 .th> --data_dir <cifar10_jpeg>`): the same
store and report, the target >= 50% fewer parameters at <= 0.5 points; `dense_student` needs a hidden width and is
refused there, `svd` and `layer_drop` match `--match rmtkd_front_b30@0` or another row. On the 2-core CPU a training
step of 128 images takes about 1.5 s on one thread with the teacher's forward (10 minutes per epoch of the 50,000), so
two invocations run side by side on one store, one thread each (`update_store` keeps both rows): the CPU protocol of
`results/recovery_resnet56_cifar10_cpu.md` is a 3-epoch teacher, then 2 epochs per row (about 25 minutes a row):

    python examples/benchmarks/bench_recovery.py --task cifar10 --checkpoint ../shared/data/resnet_cifar10/resnet56-4bfd9763.th \\
        --data_dir ../shared/data/cifar10_jpeg --teacher_epochs 3 --teacher_learning_rate 1e-3 --learning_rate 1e-3 \\
        --num_train_epochs 2 --per_device_train_batch_size 128 --calibration_samples 2000 \\
        --output_dir outputs/recovery-cifar10-cpu --results_file examples/benchmarks/results/recovery_resnet56_cifar10_cpu.md
    OMP_NUM_THREADS=1 python examples/benchmarks/bench_recovery.py ...same... --recipes rmtkd_front_b30 &
    OMP_NUM_THREADS=1 python examples/benchmarks/bench_recovery.py ...same... --recipes rmtkd_front &
    OMP_NUM_THREADS=1 python examples/benchmarks/bench_recovery.py ...same... --recipes svd --match rmtkd_front_b30@0 &
    OMP_NUM_THREADS=1 python examples/benchmarks/bench_recovery.py ...same... --recipes layer_drop --match rmtkd_front_b30@0 &

On a GPU use the issue's budget instead (`--teacher_epochs 10 --num_train_epochs 8 --dataloader_num_workers 16`;
bench_peers' H100 runs of those epochs took 3-4 minutes per row).

Run in the background (about 20-30 minutes per recipe and epoch on 2 CPU cores):

    nohup python examples/benchmarks/bench_recovery.py --data_dir ../shared/data/sst2 \\
        --recipes hidden_logits,hidden_both --results_file examples/benchmarks/results/recovery_minilm_sst2.md &
"""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from bench_peers import calibration_loader, measure, teacher_ref, trainable
from peers import drop_layers, svd_like, svd_to_size
from recovery_recipes import BASELINES, OFF, RECIPES
from recovery_report import is_stored, report, row_key
from safetensors.torch import load_model, save_model
from tasks import build_task
from transformers import HfArgumentParser, Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from hf_rmtkd import RMTKDTrainer, RMTKDTrainingArguments
from hf_rmtkd.analysis import SpectralReport, analyze_sites
from hf_rmtkd.compression import to_rmtkd
from hf_rmtkd.pipeline import apply_report, reduce_hidden
from hf_rmtkd.reporting import machine_line, open_store, update_store, write_results
from hf_rmtkd.sites import select_sites


@dataclass
class RecoveryArguments:
    data_dir: str = field(
        default="", metadata={"help": "SST-2: folder with train.tsv and dev.tsv; cifar10: the JPEG parquet folder."}
    )
    model_name_or_path: str | None = field(default=None, metadata={"help": "Teacher base; default pip MiniLM."})
    train_samples: int | None = field(default=None, metadata={"help": "Seeded training subset; default all."})
    eval_samples: int | None = field(default=None, metadata={"help": "Dev / test subset; default all."})
    max_length: int = field(default=64, metadata={"help": "Tokens per sentence."})
    teacher_epochs: float = field(default=1.0)
    teacher_learning_rate: float = field(default=1e-4)
    recipes: str = field(
        default="", metadata={"help": f"Comma-separated, of {tuple(RECIPES) + tuple(BASELINES)}; empty: teacher only."}
    )
    match: str = field(default="hidden_both@0", metadata={"help": "The row a baseline matches in parameters."})
    match_params: int | None = field(
        default=None,
        metadata={
            "help": "The `--match` row's whole-model parameter count, for a row of another store (same teacher): "
            "`svd_size` and `layer_drop` then need only this number and that recipe's losses."
        },
    )
    seeds: str = field(default="0", metadata={"help": "Comma-separated seeds; one row per recipe and seed."})
    latency_repeats: int = field(default=20)
    results_file: str | None = field(default=None, metadata={"help": "Markdown results file."})
    task: str = "sst2"
    checkpoint: str | None = None

    def __post_init__(self):
        unknown = {r for r in self.recipes.split(",") if r} - set(RECIPES) - set(BASELINES)
        if unknown:
            allowed = tuple(RECIPES) + tuple(BASELINES)
            raise ValueError(f"`recipes` has unknown entries {sorted(unknown)}; allowed: {allowed}.")
        try:
            [int(s) for s in self.seeds.split(",")]
        except ValueError:
            raise ValueError(f"`seeds` must be comma-separated integers, got {self.seeds!r}.") from None


def teacher_model(task, bench: RecoveryArguments, args, rows: dict, out: Path):
    """The saved teacher, or a new one fine-tuned (plain `Trainer`, cross-entropy) on the whole training set."""
    folder = out / "teacher"
    if (folder / "config.json").exists():
        return task.load_teacher(folder).to(args.device)
    model = task.new_teacher()
    training = TrainingArguments(
        output_dir=str(folder),
        num_train_epochs=bench.teacher_epochs,
        learning_rate=bench.teacher_learning_rate,
        warmup_steps=0.06,
        **{k: getattr(args, k) for k in ("per_device_train_batch_size", "weight_decay", "seed", "data_seed")},
        **{k: getattr(args, k) for k in ("use_cpu", "logging_steps", "train_sampling_strategy")},
        # Checkpoints every 200 steps: a run killed mid-epoch resumes where it was.
        save_strategy="steps",
        save_steps=200,
        save_total_limit=1,
        report_to=[],
    )
    began = time.perf_counter()
    Trainer(model=model, args=training, train_dataset=task.train, data_collator=task.collator).train(
        resume_from_checkpoint=last_checkpoint(folder)
    )
    rows["_teacher_epoch_minutes"] = (time.perf_counter() - began) / 60 / bench.teacher_epochs
    model.save_pretrained(folder)
    return model


BASELINE_WEIGHTS = "baseline.safetensors"


def row_folder(args, name: str, seed: int, match: str) -> Path:
    """Where a row trains: its checkpoints, then a recipe's final model or a baseline's weights
    (`<output_dir>/<name>-seed<seed>`; a baseline's folder also names the row it matches)."""
    if name in BASELINES:
        return Path(args.output_dir) / f"{name}-{match.replace('@', '-seed')}-seed{seed}"
    return Path(args.output_dir) / f"{name}-seed{seed}"


def drop_checkpoints(folder: Path) -> None:
    """Remove a finished row's `checkpoint-*` folders: its figures are in the store and a recipe's final model stays
    beside them (a baseline's weights too; a MiniLM checkpoint with its optimizer state is about 270 MB)."""
    for checkpoint in Path(folder).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        shutil.rmtree(checkpoint)


def last_checkpoint(folder: Path) -> str | None:
    """The latest `checkpoint-<step>` in `folder` (None when there is none): a run killed mid-way resumes from it."""
    return get_last_checkpoint(str(folder)) if Path(folder).is_dir() else None


def dense_student(teacher, task, args, width: int, target_params: int):
    """The `dense_student` baseline before distillation (see the module text) and its FFN width."""
    model = to_rmtkd(trainable(copy.deepcopy(teacher)))
    calibration = calibration_loader(task, args)
    options = args.spectral_options()
    reduce_hidden(model, calibration, options, progress=False, width=width)
    sites = [site for site in select_sites(model.model, None) if site.kind == "ffn"]
    report = analyze_sites(model.model, calibration, sites, options, progress=False)
    per_neuron = 2 * width + 1  # a row of the FFN's input layer, its bias, a column of its output layer
    excess = model.num_parameters() - target_params
    inner = sites[0].dim - math.ceil(excess / (len(sites) * per_neuron))
    if inner < 1:
        # A row whose token table was factorised: narrowing the FFNs alone cannot reach its size.
        raise ValueError(
            f"A dense student of width {width} cannot be cut to {target_params:,} parameters through its FFN widths."
        )
    uniform = {n: dataclasses.replace(site, rank=inner) for n, site in report.items()}
    apply_report(model, SpectralReport(uniform, report.options, report.fingerprint))
    return model, inner


def baseline_target(name: str, rows: dict, match: str, match_params: int | None = None) -> dict:
    """The row a baseline matches: `rows[match]`, or `{"params": match_params}` for a row of another store, which
    only the baselines that need nothing but a parameter count (`svd_size`, `layer_drop`) accept."""
    if match in rows:
        if match_params is not None and match_params != rows[match]["params"]:
            raise ValueError(
                f"`--match_params` {match_params:,} contradicts the stored `{match}` row's {rows[match]['params']:,}."
            )
        return rows[match]
    if match_params is None or name not in ("svd_size", "layer_drop"):
        raise ValueError(
            f"`--match` row {match!r} is not in the store yet: run that recipe first (or, for svd_size and "
            "layer_drop, give its parameter count as `--match_params`)."
        )
    return {"params": match_params}


def build_baseline(
    name: str, teacher, task, args, rows: dict, match: str, match_params: int | None = None
) -> tuple[torch.nn.Module, dict]:
    """The untrained baseline `name` at the parameter count of the `match` row (`match_params` when given: a row of
    another store): deterministic in the teacher and the target, so a checkpoint or saved weights fit it."""
    target = baseline_target(name, rows, match, match_params)
    if name == "dense_student":
        if target.get("hidden_size") is None:
            raise ValueError(f"`--match` {match!r} has no hidden width to build a dense student of.")
        model, inner = dense_student(teacher, task, args, target["hidden_size"], target["params"])
        detail = {"hidden_size": target["hidden_size"], "ffn_width": inner}
    elif name == "svd":
        if target.get("hidden_size") != getattr(teacher.config, "hidden_size", None):
            raise ValueError(
                f"`--match` {match!r} reduced the hidden width: truncated SVD cannot match its embeddings."
            )
        name_, seed_ = match.split("@")
        reference = task.load_rmtkd(row_folder(args, name_, int(seed_), ""))
        model, ranks = svd_like(teacher, reference.config.reduced_modules, reference.model)
        detail = {"ranks": ranks}
    elif name == "svd_size":
        model, ranks = svd_to_size(teacher, target["params"], skip=task.dense_modules)
        detail = {"ranks": ranks}
    else:
        model, kept = drop_layers(teacher, target["params"])
        detail = {"kept_blocks": kept}
    return trainable(model), detail


def run_baseline(
    name: str, seed: int, teacher, task, args, rows: dict, match: str, match_params: int | None = None
) -> tuple[torch.nn.Module, dict]:
    """A baseline ([`build_baseline`]) distilled with the `match` recipe's losses and budget; its final weights are
    saved as `<row folder>/baseline.safetensors` ([`load_baseline`] reads them back)."""
    overrides = RECIPES[match.split("@")[0]][1]
    # The loss terms only: a baseline always distils from the fine-tuned teacher (given as the external one).
    losses = {k: v for k, v in overrides.items() if k.startswith("distillation_") and k != "distillation_teacher"}
    began = time.perf_counter()
    model, detail = build_baseline(name, teacher, task, args, rows, match, match_params)
    recipe_args = dataclasses.replace(
        args,
        output_dir=str(row_folder(args, name, seed, match)),
        seed=seed,
        data_seed=seed,
        reduction_schedule="none",
        distillation_teacher="external",
        **{**OFF, **losses},
    )
    trainer = RMTKDTrainer(
        model=model, args=recipe_args, train_dataset=task.train, data_collator=task.collator, teacher_model=teacher
    )
    # The baseline is rebuilt the same way (deterministic in the teacher and the target), so a checkpoint fits it.
    trainer.train(resume_from_checkpoint=last_checkpoint(Path(recipe_args.output_dir)))
    detail["minutes"] = (time.perf_counter() - began) / 60
    # Weights only: the structure is not one `from_pretrained` rebuilds from a config, so it is rebuilt as above.
    save_model(trainer.model, str(Path(recipe_args.output_dir) / BASELINE_WEIGHTS))
    return trainer.model, {**detail, "matched": match}


def load_baseline(
    name: str, seed: int, teacher, task, args, rows: dict, match: str, match_params: int | None = None
) -> torch.nn.Module:
    """A stored baseline row's trained model (to time it again, say): rebuilt by [`build_baseline`], then its saved
    weights loaded. Raises `FileNotFoundError` when the row saved none (rows stored before the weights were kept)."""
    weights = row_folder(args, name, seed, match) / BASELINE_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights} does not exist: the row {name} (seed {seed}, matched to {match}) saved no weights."
        )
    model, _ = build_baseline(name, teacher, task, args, rows, match, match_params)
    # Wrapped as `RMTKDTrainer` wraps what it trains, so the saved names and the returned type are the trained row's.
    model = to_rmtkd(model)
    load_model(model, str(weights))
    return model.eval()


def run_recipe(name: str, seed: int, teacher, task, args) -> tuple[torch.nn.Module, dict]:
    overrides = RECIPES[name][1]
    recipe_args = dataclasses.replace(
        args,
        output_dir=str(row_folder(args, name, seed, "")),
        seed=seed,
        data_seed=seed,
        **({**OFF, **overrides} if name.startswith("hidden") else overrides),
    )
    trainer = RMTKDTrainer(
        model=trainable(copy.deepcopy(teacher)),
        args=recipe_args,
        train_dataset=task.train,
        data_collator=task.collator,
    )
    began = time.perf_counter()
    # RMTKDTrainer rebuilds the reduced shapes, schedule and teacher a checkpoint records, then loads its weights.
    result = trainer.train(resume_from_checkpoint=last_checkpoint(Path(recipe_args.output_dir)))
    trainer.save_model()
    model = trainer.model
    detail = {
        "minutes": (time.perf_counter() - began) / 60,
        "train_steps": result.global_step,
        "hidden_size": getattr(model.model.config, "hidden_size", None),
        "ranks": model.config.ranks(),
        "losses": {k: v for k, v in trainer.state.log_history[-2].items() if k.endswith("loss")},
    }
    return model, detail


def main(bench: RecoveryArguments, args: RMTKDTrainingArguments) -> None:
    if bench.task != "sst2" and args.train_sampling_strategy == "group_by_length":
        # Length grouping is for text (the default here); images have no length.
        args = dataclasses.replace(args, train_sampling_strategy="random")
    out = Path(args.output_dir)
    store, rows = open_store(args.output_dir)
    task = build_task(bench, args)
    teacher = teacher_model(task, bench, args, rows, out)
    # The teacher is measured in every invocation (its accuracy is every row's reference); each row's latency ratio
    # uses the teacher timed in turn with that row (`measure(..., reference=teacher)`).
    current = measure(teacher, task, args, bench.latency_repeats)
    fresh = {"teacher": {**rows.get("teacher", {}), **current}}
    if "_teacher_epoch_minutes" in rows:
        fresh["_teacher_epoch_minutes"] = rows["_teacher_epoch_minutes"]
    # Every write merges into the store as it is on disk: invocations may run side by side on one store.
    rows = update_store(store, fresh)
    for name in [r for r in bench.recipes.split(",") if r]:
        for seed in [int(s) for s in bench.seeds.split(",")]:
            rows = open_store(args.output_dir)[1]
            if is_stored(rows, name, seed, bench.match):
                continue
            if name in BASELINES:
                model, detail = run_baseline(name, seed, teacher, task, args, rows, bench.match, bench.match_params)
            else:
                model, detail = run_recipe(name, seed, teacher, task, args)
            row = {**measure(model, task, args, bench.latency_repeats, reference=teacher), **detail}
            # Accuracy against this invocation's teacher; latency against the teacher timed in turn with the row.
            row["teacher_ref"] = teacher_ref(row, current)
            rows = update_store(store, {row_key(name, seed, bench.match): row})
            drop_checkpoints(row_folder(args, name, seed, bench.match))
    setup = task.describe(bench, args)["text"]
    if args.max_steps > 0:
        steps = args.max_steps * args.per_device_train_batch_size
        setup += (
            f" Budget of every recipe: {args.max_steps} optimizer steps ({steps:,} examples drawn from the whole "
            "training set), not the epochs above."
        )
    meta = {"_machine": machine_line(), "_setup": setup, "_task": bench.task, "_title": task.name}
    rows = update_store(store, {**meta, "_eval_count": len(task.eval)}, command=" ".join(sys.argv))
    write_results(bench.results_file, report(rows))


if __name__ == "__main__":
    parser = HfArgumentParser((RecoveryArguments, RMTKDTrainingArguments))
    parser.set_defaults(
        output_dir="outputs/recovery-sst2",
        num_train_epochs=1,
        learning_rate=5e-5,
        weight_decay=0.01,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        logging_steps=100,
        # Every row checkpoints (one kept, dropped when the row is stored), so a killed row resumes mid-training.
        save_strategy="steps",
        save_steps=500,
        save_total_limit=1,
        report_to=[],
        seed=0,
        data_seed=0,
        train_sampling_strategy="group_by_length",
        calibration_samples=4000,
        use_cpu=not torch.cuda.is_available(),
    )
    main(*parser.parse_args_into_dataclasses())
