"""The README's Python blocks run as written, in order, on a tiny BERT with a real tokenizer (Hub calls go to the
loopback test server of conftest.py)."""

import dataclasses
import re

import numpy as np
import torch
import transformers as tf
from conftest import REPO_ROOT, tiny_config
from datasets import Dataset
from testing_utils import WORDS, word_tokenizer

from hf_rmtkd import LowRankConv2d, RMTKDTrainer


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO_ROOT / "README.md").read_text(), flags=re.S)


def _sentences(n, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        label = int(rng.integers(2))
        words = list(rng.choice(WORDS[8:], 4)) + [WORDS[int(rng.integers(4)) + (0 if label else 4)]]
        rows.append((" ".join(rng.permutation(words)), label))
    return rows


def _dataset(tokenizer, n, seed):
    rows = _sentences(n, seed)
    encoded = tokenizer([t for t, _ in rows], padding="max_length", max_length=10)
    return Dataset.from_dict({**encoded, "labels": [label for _, label in rows]})


def _user_model(folder):
    """What a user has before the README: a fine-tuned classifier saved with its tokenizer."""
    torch.manual_seed(0)
    config = tiny_config("bert", num_labels=2)
    config.vocab_size = len(WORDS) + 5
    model = tf.BertForSequenceClassification(config)
    tokenizer = word_tokenizer(folder)
    train = _dataset(tokenizer, 256, 0)
    args = tf.TrainingArguments(str(folder / "ft"), num_train_epochs=3, learning_rate=3e-3, report_to=[],
                                use_cpu=True, disable_tqdm=True, save_strategy="no")  # fmt: skip
    tf.Trainer(model=model, args=args, train_dataset=train).train()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _sentence_model(folder):
    """A tiny SentenceTransformer (Transformer + mean Pooling + Normalize) saved in `folder / "sentence-model"`."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    # Built on the user's tiny BERT and tokenizer (`_user_model`, already saved in `folder / "user-model"`).
    modules = [Transformer(str(folder / "user-model")), Pooling(tiny_config("bert").hidden_size), Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save(str(folder / "sentence-model"))
    return folder / "sentence-model"


def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch):
    blocks = _blocks()
    assert len(blocks) >= 4
    user = tmp_path / "user-model"
    user.mkdir()
    tokenizer = _user_model(user)
    monkeypatch.chdir(tmp_path)

    def fresh_model():
        return tf.AutoModelForSequenceClassification.from_pretrained(user)

    namespace = {
        "model": fresh_model(),
        "calibration_batches": [
            {k: torch.tensor(v) for k, v in _dataset(tokenizer, 64, s)[:].items() if k != "labels"} for s in (1, 2)
        ],
        "train": _dataset(tokenizer, 256, 3),
        "dev": _dataset(tokenizer, 256, 4),
        "accuracy": lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())},
    }
    exec(blocks[0], namespace)  # analysis
    assert (tmp_path / "spectra").is_dir()
    exec(blocks[1], namespace)  # compress, save, reload, pipeline
    assert namespace["classify"]("a good film")[0]["label"] in {"LABEL_0", "LABEL_1"}
    namespace["model"] = fresh_model()  # the training block starts from the user's model, as the README says
    exec(blocks[2], namespace)  # train with RMTKDTrainer
    trainer = namespace["trainer"]
    done = [h for h in trainer.reduction_callback.history if not h.get("undone")]
    assert done and trainer.model.num_parameters() < fresh_model().num_parameters()  # the snippet compresses
    budget = next(i for i, block in enumerate(blocks) if "search_output_error" in block)
    namespace["model"] = fresh_model()
    exec(blocks[budget].replace("path/to/your/model", str(user)), namespace)  # the output-error budget
    assert any(t.accepted for t in namespace["tries"]) and namespace["record"].budget_rank is not None
    hub = next(i for i, block in enumerate(blocks) if "push_to_hub" in block)
    exec(blocks[hub], namespace)  # Hub: push and load back
    assert isinstance(namespace["model"], tf.PreTrainedModel)
    int8 = next(i for i, block in enumerate(blocks) if "quantize_int8" in block)
    exec(blocks[int8], namespace)  # int8 on top
    assert namespace["onnx_int8_path"].is_file()
    sentence = next(i for i, block in enumerate(blocks) if "distill_sentence_transformer" in block)
    exec(blocks[sentence].replace("path/to/sentence-model", str(_sentence_model(tmp_path))), namespace)
    assert (tmp_path / "sentence-model-rmtkd" / "modules.json").is_file()
    assert namespace["trainer"].reduction_callback.history  # the training route compresses too
    assert (tmp_path / "sentence-model-rmtkd-trained" / "modules.json").is_file()
    high = next(i for i, block in enumerate(blocks) if "high_compression" in block)
    exec(blocks[high], namespace)  # the high-compression recipe, run briefly on the user's model
    short = dict(max_steps=4, per_device_train_batch_size=8, use_cpu=True, disable_tqdm=True, calibration_samples=64)
    args = dataclasses.replace(namespace["high_compression"], **short)
    trainer = RMTKDTrainer(model=fresh_model(), args=args, train_dataset=namespace["train"])
    trainer.train()
    assert [h["step"] for h in trainer.reduction_callback.history] == [0, 1]  # everything first
    assert (
        trainer.model.model.config.hidden_size < 32
        and "bert.embeddings.word_embeddings" in trainer.model.config.ranks()
    )
    assert trainer.teacher.model.config.hidden_size == 32  # the original teacher
    conv = next(i for i, block in enumerate(blocks) if 'convolutions="factorize"' in block)
    exec(blocks[conv], namespace)  # factorised convolutions on a CIFAR ResNet-20
    compressed, decisions = namespace["compressed"], namespace["decisions"]
    assert set(decisions) == {p for p, r in compressed.config.reduced_modules.items() if r.kind == "conv"}
    for path, decision in decisions.items():  # each conv kept in the form its timing chose
        kept = compressed.model.get_submodule(path)
        assert isinstance(kept, LowRankConv2d) != decision["merged"] and decision["input_shape"][0] == 1
    blocks_run = {budget, hub, int8, sentence, high, conv, 0, 1, 2}
    assert blocks_run == set(range(len(blocks))), "a README block that no test runs"
