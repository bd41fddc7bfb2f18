"""PEFT on compressed models: LoRA on the reduced modules, adapter save/load on the RMTKD checkpoint, merge back."""

import pytest
import torch
import transformers as tf
from conftest import tiny_batches, tiny_model
from peft import AutoPeftModelForSequenceClassification, LoraConfig, PeftModel, get_peft_model

import hf_rmtkd
from hf_rmtkd import RMTKDTrainer, RMTKDTrainingArguments


# Reduced FFN layers are plain nn.Linear of the new width; factorised layers are LowRankLinear(down, up), whose
# `down`/`up` children are the targets (the regex keeps `attention.output.dense`, a LowRankLinear, out).
LORA_TARGETS = r".*\.(intermediate\.dense|\d+\.output\.dense|query\.down|query\.up|value\.up)"


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rmtkd")
    compressed = hf_rmtkd.compress(tiny_model("bert", "sequence"), tiny_batches("bert", n_batches=8), progress=False)
    compressed.save_pretrained(folder)
    return folder, compressed.num_parameters()


def _train_lora(model, steps=10):
    batches = tiny_batches("bert", n_batches=2, seed=3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for step in range(steps):
        loss = model(**batches[step % 2], labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


class TestLoRAOnCompressedModels:
    def test_lora_trains_saves_loads_and_merges_into_a_plain_rmtkd_checkpoint(self, tmp_path, checkpoint):
        folder, n_params = checkpoint
        base = tf.AutoModelForSequenceClassification.from_pretrained(folder)
        batch = tiny_batches("bert", n_batches=1, seed=9)[0]
        untouched = _logits(base, batch)
        lora = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=LORA_TARGETS, task_type="SEQ_CLS"))
        names = [n for n, _ in lora.named_parameters() if "lora_A" in n]
        for target in ("intermediate.dense", "layer.1.output.dense", "query.down", "query.up", "value.up"):
            assert any(f".{target}.lora_A." in n for n in names), target
        assert not any("attention.output.dense" in n for n in names)
        _train_lora(lora)
        tuned = _logits(lora, batch)
        assert not torch.allclose(tuned, untouched, atol=1e-4)

        lora.save_pretrained(tmp_path / "adapter")
        assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
        assert not (tmp_path / "adapter" / "model.safetensors").exists()
        reloaded = PeftModel.from_pretrained(
            tf.AutoModelForSequenceClassification.from_pretrained(folder), tmp_path / "adapter"
        )
        torch.testing.assert_close(_logits(reloaded, batch), tuned, rtol=0, atol=1e-5)
        by_auto = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
        torch.testing.assert_close(_logits(by_auto, batch), tuned, rtol=0, atol=1e-5)

        merged = reloaded.merge_and_unload()
        assert type(merged).__name__ == "RMTKDForSequenceClassification"
        merged.save_pretrained(tmp_path / "merged")
        plain = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
        assert type(plain).__name__ == "RMTKDForSequenceClassification"
        assert plain.num_parameters() == n_params
        assert not any("lora" in n for n, _ in plain.named_parameters())
        torch.testing.assert_close(_logits(plain, batch), tuned, rtol=0, atol=1e-5)


class TestPeftModelsAreMergedFirst:
    def test_rmtkd_trainer_merges_a_peft_model_and_says_so(self, tmp_path, caplog):
        config = tiny_model("bert", "sequence").config
        torch.manual_seed(0)
        model = get_peft_model(tf.BertForSequenceClassification(config), LoraConfig(r=2, target_modules=["query"]))
        args = RMTKDTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1)
        with caplog.at_level("WARNING", logger="hf_rmtkd.compression"):
            trainer = RMTKDTrainer(model=model, args=args)
        assert "Merging the PEFT adapters" in caplog.text
        assert type(trainer.model.model).__name__ == "BertForSequenceClassification"
        assert not any("lora" in n for n, _ in trainer.model.named_parameters())
