"""pack_for_device.py: a model staged in float16 shards reloads in float32, and the calls that carry it keep to the
device's per-call limits (at most 8 paths and the byte budget each, every staged file exactly once)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import tiny_config
from testing_utils import BENCHMARKS, run_device_script


sys.path.insert(0, str(BENCHMARKS))

from pack_for_device import MIB, PackArguments, main, plan_calls  # noqa: E402


def _model_folder(root: Path) -> Path:
    config = tiny_config("mpnet", num_labels=2)
    # Every tensor under 1 MiB in float16, together about 1.4 MiB: more than one 1 MiB shard.
    config.vocab_size, config.intermediate_size = 14000, 2000
    torch.manual_seed(0)
    folder = root / "tiny-mpnet"
    tf.MPNetModel(config).save_pretrained(folder)
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "film"]))
    tf.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    return folder


def test_staged_shards_reload_in_float32_and_every_call_keeps_to_the_limits(tmp_path, monkeypatch):
    source = _model_folder(tmp_path)
    sst2 = tmp_path / "sst2"
    sst2.mkdir()
    for split in ("train.tsv", "dev.tsv"):
        (sst2 / split).write_text("text_a\tlabel\na film\t1\n")
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    (repo / ".gitignore").write_text("/.gpu/\n")
    monkeypatch.chdir(repo)

    calls = main(PackArguments(model_dir=str(source), folders=str(sst2), shard_mb=1, call_mb=2))

    staged = repo / ".gpu" / "tiny-mpnet"
    shards = sorted(staged.glob("model-*.safetensors"))
    assert len(shards) >= 2 and all(p.stat().st_size <= MIB for p in shards)
    carried = [name for call in calls for name in call]
    expected = sorted([str(p.relative_to(repo)) for p in staged.iterdir()] + [".gpu/sst2"])
    assert sorted(carried) == expected  # each once; the model's files one by one, never its folder
    budget = 2 * MIB - len((repo / ".gitignore").read_bytes())
    for call in calls:
        sizes = [
            sum(f.stat().st_size for f in (repo / n).rglob("*")) if (repo / n).is_dir() else (repo / n).stat().st_size
            for n in call
        ]
        assert len(call) <= 8 and sum(sizes) <= budget

    # The benchmark's teacher loads the staged folder in float32, the weights equal to float16 precision.
    reloaded = tf.AutoModelForSequenceClassification.from_pretrained(staged, num_labels=2, dtype=torch.float32)
    original = tf.MPNetModel.from_pretrained(source)
    assert reloaded.dtype == torch.float32
    word = "embeddings.word_embeddings.weight"
    torch.testing.assert_close(reloaded.mpnet.state_dict()[word], original.state_dict()[word], atol=1e-3, rtol=1e-3)
    text = "a film"
    assert (
        tf.AutoTokenizer.from_pretrained(staged)(text).input_ids
        == tf.AutoTokenizer.from_pretrained(source)(text).input_ids
    )


def test_plan_refuses_what_no_call_can_carry_and_bad_sizes(tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * 2048)
    with pytest.raises(ValueError, match="more than a call carries"):
        plan_calls([big], tmp_path, budget=1024)
    nine = [tmp_path / f"f{i}" for i in range(9)]
    for path in nine:
        path.write_bytes(b"x")
    assert [len(call) for call in plan_calls(nine, tmp_path, budget=1024)] == [8, 1]
    sizes = {"a": 600, "b": 500, "c": 400, "d": 300}
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(b"\0" * size)
    calls = plan_calls([tmp_path / n for n in sizes], tmp_path, budget=1000)
    assert calls == [["a", "c"], ["b", "d"]]  # largest first, each into the first call it fits
    with pytest.raises(ValueError, match="`shard_mb` must be in"):
        PackArguments(folders=str(tmp_path), shard_mb=60, call_mb=60)
    with pytest.raises(ValueError, match="`model_dir` .* has no config.json"):
        PackArguments(model_dir=str(tmp_path))
    with pytest.raises(ValueError, match="`folders` names .*, which are not folders"):
        PackArguments(folders=str(tmp_path / "a"))
    with pytest.raises(ValueError, match="Nothing to stage"):
        PackArguments()


def test_the_mpnet_device_script_runs_a_staged_encoder_end_to_end(tmp_path):
    # The script a GPU session runs in its last call, here on CPU with a tiny BERT and 48 sentences: the teacher and
    # the 80% recipe land in the results file and the JSON store under $OUT.
    config = tiny_config("bert", num_labels=2)
    folder = tmp_path / "tiny-bert"
    torch.manual_seed(0)
    tf.BertModel(config).save_pretrained(folder)
    vocab = tmp_path / "vocab.txt"
    words = ["a", "film", "good", "bad", "dull", "fine", "plot", "very"]
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    tf.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    sst2 = tmp_path / "sst2"
    sst2.mkdir()
    generator = torch.Generator().manual_seed(0)
    rows = [" ".join(words[i] for i in torch.randint(0, 8, (6,), generator=generator)) for _ in range(48)]
    for split in ("train.tsv", "dev.tsv"):
        (sst2 / split).write_text("text_a\tlabel\n" + "".join(f"{r}\t{i % 2}\n" for i, r in enumerate(rows)))
    out, run = tmp_path / "out", tmp_path / "run"
    extra = ["--max_steps", "1", "--calibration_samples", "16", "--latency_repeats", "1", "--tf32", "false"]
    extra += ["--per_device_train_batch_size", "16", "--max_length", "16"]
    finished = run_device_script("device_mpnet_sst2.sh", tmp_path, out, run, extra, MODEL=str(folder))
    assert finished.returncode == 0, finished.stdout[-3000:]
    stored = json.loads((out / "results.json").read_text())
    assert {"teacher", "hidden_emb_front_b12@0"} <= set(stored)
    assert stored["hidden_emb_front_b12@0"]["params"] < stored["teacher"]["params"]
    report = (out / "recovery_mpnet_sst2_gpu.md").read_text()
    assert "SST-2, tiny-bert" in report and "output-error budget 0.12" in report
