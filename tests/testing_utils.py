"""Builders shared by several test files: tiny models, datasets and trainer arguments (no test lives here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import transformers as tf
from conftest import tiny_config
from datasets import Dataset

from hf_rmtkd import RMTKDTrainingArguments


WORDS = ["good", "great", "fine", "fun", "bad", "awful", "dull", "poor", "the", "film", "was", "a", "plot", "cast"]


def word_tokenizer(folder):
    """A real BERT WordPiece tokenizer over `WORDS`, its vocabulary written into `folder`."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 takes the vocabulary as `vocab` (a `vocab_file=` keyword is silently ignored: every word -> [UNK]).
    tokenizer = tf.BertTokenizerFast(vocab=str(folder / "vocab.txt"))
    assert tokenizer("good film")["input_ids"] == [2, 5 + WORDS.index("good"), 5 + WORDS.index("film"), 3]
    return tokenizer


def random_sentences(n, seed):
    """`n` six-word sentences over `WORDS`, seeded."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, 6)) for _ in range(n)]


def tiny_sentence_transformer(folder, dropout=0.1, dense: int | None = None):
    """Save a tiny BERT `SentenceTransformer` (Transformer + Pooling [+ Dense] + Normalize) under `folder`/st."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

    torch.manual_seed(0)
    config = tiny_config("bert")
    config.vocab_size = len(WORDS) + 5
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
    tf.BertModel(config).save_pretrained(folder / "bert")
    word_tokenizer(folder / "bert").save_pretrained(folder / "bert")
    modules = [Transformer(str(folder / "bert")), Pooling(config.hidden_size)]
    if dense is not None:
        modules.append(Dense(config.hidden_size, dense))
    model = SentenceTransformer(modules=[*modules, Normalize()], device="cpu")
    model.save(str(folder / "st"))
    return folder / "st"


def tiny_classifier(seed=0, dropout=0.0):
    """A tiny random BERT sequence classifier with 2 labels."""
    config = tiny_config("bert", num_labels=2)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
    torch.manual_seed(seed)
    return tf.BertForSequenceClassification(config)


def labelled_dataset(n=128, seq=12, seed=0) -> Dataset:
    """Random token ids whose label is learnable from one token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 99, (n, seq), generator=g)
    labels = (ids[:, 1] > 52).long()
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * seq] * n, "labels": labels.tolist()})


def lm_dataset(n=32, seq=10) -> Dataset:
    """Random token ids as a causal-LM dataset (labels = inputs)."""
    ids = torch.randint(2, 99, (n, seq), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def trainer_args(tmp_path, **overrides) -> RMTKDTrainingArguments:
    """Short, quiet, deterministic CPU runs."""
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        per_device_eval_batch_size=32,
        num_train_epochs=2,
        learning_rate=2e-3,
        logging_steps=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        calibration_samples=64,
        seed=0,
        data_seed=0,
    )
    values.update(overrides)
    return RMTKDTrainingArguments(**values)


def hidden_trainer_args(path, **overrides) -> RMTKDTrainingArguments:
    """Short `RMTKDTrainer` runs whose first scheduled reduction is the hidden width (tiny models, CPU)."""
    hidden = dict(max_steps=8, per_device_train_batch_size=8, learning_rate=1e-3, calibration_samples=16)
    hidden.update(reduction_hidden_width=True, reduction_warmup_steps=1, reduction_recovery_steps=3)
    return trainer_args(path, **{**hidden, **overrides})


def token_ids(seed=0):
    return torch.randint(2, 99, (3, 10), generator=torch.Generator().manual_seed(seed))


def planted_llama(k=12, seed=0):
    """A tiny Llama whose residual stream lies in a k-dim subspace (embeddings and every writer project onto it),
    with non-trivial norm weights; returns the model and the subspace's basis `(32, k)`."""
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(tiny_config("llama")).eval()
    d = model.config.hidden_size
    basis, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed + 1)))
    projector = basis @ basis.T
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight @ projector)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.copy_(projector @ layer.self_attn.o_proj.weight)
            layer.mlp.down_proj.weight.copy_(projector @ layer.mlp.down_proj.weight)
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
        model.model.norm.weight.uniform_(0.5, 1.5)
    return model, basis


def tiny_resnet(seed: int = 0):
    """A CIFAR ResNet-8 (widths 4/8/16, 8 x 8 images) in eval mode, with non-trivial BatchNorm statistics as in a
    trained network."""
    from hf_rmtkd import ResNetCifarConfig, ResNetCifarForImageClassification

    torch.manual_seed(seed)
    model = ResNetCifarForImageClassification(ResNetCifarConfig(depth=8, widths=[4, 8, 16], image_size=8))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.3)
    return model.eval()


def random_images(n: int = 16, seed: int = 0, size: int = 8) -> torch.Tensor:
    """Gaussian images of shape `(n, 3, size, size)`."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def image_blobs(n: int = 48, size: int = 8, seed: int = 0) -> list[bytes]:
    """`n` random RGB images of `size` x `size` as PNG bytes (lossless, so every route decodes the same pixels)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    blobs = []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
        blobs.append(buffer.getvalue())
    return blobs


def write_image_parquet(path: Path, blobs: list[bytes]) -> Path:
    """The layout of ../shared/data/cifar10_jpeg: encoded images in a `jpeg` column, labels `i % 10`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"jpeg": blobs, "label": [i % 10 for i in range(len(blobs))]}), path)
    return path


BENCHMARKS = Path(__file__).resolve().parents[1] / "examples" / "benchmarks"


def run_device_script(
    name: str, stage: Path, out: Path, run: Path, extra: list[str], **env
) -> subprocess.CompletedProcess:
    """Run `examples/benchmarks/<name>` as a device session would, on CPU: `STAGE`, `OUT` and `RUN` set (and `env`),
    this interpreter first on the path, one thread; `extra` goes to every bench invocation of the script."""
    environment = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        **{"STAGE": str(stage), "OUT": str(out), "RUN": str(run), "OMP_NUM_THREADS": "1"},
        **env,
    }
    script = BENCHMARKS / name
    return subprocess.run(
        ["bash", str(script), *extra], cwd=script.parents[2], env=environment, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip


def tiny_image_task(n: int = 12, seed: int = 3):
    """A benchmark `tasks.Task` for `tiny_resnet`: `n` random 8 x 8 images labelled `i % 10`, one set for training and
    evaluation, and random benchmark inputs."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    from tasks import RESNET_DENSE_MODULES, Task, accuracy

    examples = [{"pixel_values": x, "labels": i % 10} for i, x in enumerate(random_images(n, seed=seed))]

    def inputs(batch, device):
        return {"pixel_values": random_images(batch, seed=seed + 1).to(device)}

    return Task(
        "tiny", examples, examples, tf.default_data_collator, inputs, None, tf.AutoModelForImageClassification, "tiny",
        accuracy, dense_modules=RESNET_DENSE_MODULES,
    )  # fmt: skip
