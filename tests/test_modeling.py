"""The RMTKD checkpoint format: every family round-trips through save_pretrained / Auto*.from_pretrained."""

import json
import shutil

import pytest
import torch
import transformers as tf
from conftest import TEXT_VOCAB, tiny_batches, tiny_model

import hf_rmtkd
from hf_rmtkd import RMTKDConfig


AUTO = {
    "base": tf.AutoModel,
    "sequence": tf.AutoModelForSequenceClassification,
    "token": tf.AutoModelForTokenClassification,
    "causal": tf.AutoModelForCausalLM,
    "image": tf.AutoModelForImageClassification,
}
CASES = [
    ("bert", "sequence", "RMTKDForSequenceClassification"),
    ("bert", "token", "RMTKDForTokenClassification"),
    ("roberta", "sequence", "RMTKDForSequenceClassification"),
    ("distilbert", "sequence", "RMTKDForSequenceClassification"),
    ("mpnet", "base", "RMTKDModel"),
    ("mpnet", "sequence", "RMTKDForSequenceClassification"),
    ("gpt2", "causal", "RMTKDForCausalLM"),
    ("llama", "causal", "RMTKDForCausalLM"),
    ("vit", "image", "RMTKDForImageClassification"),
]


def _output(out):
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family,task,cls_name", CASES)
def test_round_trip_equal_outputs_and_reduced_parameters(tmp_path, family, task, cls_name):
    model = tiny_model(family, task)
    batches = tiny_batches(family)
    original_params = _n_params(model)
    compressed = hf_rmtkd.compress(model, batches, progress=False)
    assert type(compressed).__name__ == cls_name
    assert compressed.config.reduced_modules, "nothing was reduced"
    with torch.no_grad():
        expected = _output(compressed(**batches[0]))
    compressed.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not (tmp_path / "pytorch_model.bin").exists()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "rmtkd"

    reloaded = AUTO[task].from_pretrained(tmp_path)
    assert type(reloaded).__name__ == cls_name
    with torch.no_grad():
        assert torch.allclose(_output(reloaded(**batches[0])), expected, atol=1e-5)
    assert _n_params(reloaded) == _n_params(compressed) < original_params
    assert reloaded.config.reduced_modules == compressed.config.reduced_modules


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_after_reload(tmp_path, family):
    compressed = hf_rmtkd.compress(tiny_model(family, "causal"), tiny_batches(family), progress=False)
    compressed.save_pretrained(tmp_path)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path)
    prompt = torch.tensor([[5, 9, 13, 2]])
    kwargs = {"max_new_tokens": 6, "do_sample": False, "attention_mask": torch.ones_like(prompt)}
    generated = compressed.generate(prompt, **kwargs)
    assert generated.shape == (1, 10)
    assert torch.equal(reloaded.generate(prompt, **kwargs), generated)


def test_base_model_class_loads_a_task_checkpoint(tmp_path):
    compressed = hf_rmtkd.compress(tiny_model("bert", "sequence"), tiny_batches("bert"), progress=False)
    compressed.save_pretrained(tmp_path)
    base = tf.AutoModel.from_pretrained(tmp_path)
    assert type(base).__name__ == "RMTKDModel" and type(base.model).__name__ == "BertModel"
    batch = tiny_batches("bert", 1)[0]
    with torch.no_grad():
        assert torch.allclose(
            base(**batch).last_hidden_state, compressed.model.bert(**batch).last_hidden_state, atol=1e-5
        )


def _tiny_tokenizer(path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(TEXT_VOCAB - 5)]
    (path / "vocab.txt").write_text("\n".join(vocab))
    return tf.BertTokenizerFast(vocab=str(path / "vocab.txt"))  # `vocab_file=` is ignored by transformers 5


def test_text_classification_pipeline(tmp_path):
    compressed = hf_rmtkd.compress(tiny_model("bert", "sequence"), tiny_batches("bert"), progress=False)
    tokenizer = _tiny_tokenizer(tmp_path)
    compressed.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    classify = tf.pipeline("text-classification", model=str(tmp_path / "model"))
    result = classify("w1 w2 w3")
    assert result[0]["label"] in compressed.config.id2label.values()
    with torch.no_grad():
        logits = compressed(**tokenizer("w1 w2 w3", return_tensors="pt")).logits
    assert result[0]["score"] == pytest.approx(float(logits.softmax(-1).max()), abs=1e-5)


def test_image_classification_pipeline(tmp_path):
    from PIL import Image

    compressed = hf_rmtkd.compress(tiny_model("vit", "image"), tiny_batches("vit"), progress=False)
    compressed.save_pretrained(tmp_path)
    tf.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path)
    classify = tf.pipeline("image-classification", model=str(tmp_path))
    result = classify(Image.new("RGB", (20, 20), color=(120, 30, 200)))
    assert {r["label"] for r in result} <= set(compressed.config.id2label.values())


class TestBadCheckpoints:
    @pytest.fixture
    def saved(self, tmp_path):
        compressed = hf_rmtkd.compress(tiny_model("bert", "sequence"), tiny_batches("bert"), progress=False)
        compressed.save_pretrained(tmp_path / "ok")
        return tmp_path, compressed

    def _edit_config(self, root, edit):
        target = root / "edited"
        shutil.copytree(root / "ok", target)
        config = json.loads((target / "config.json").read_text())
        edit(config)
        (target / "config.json").write_text(json.dumps(config))
        return target

    def test_rank_mismatch_names_module_and_both_shapes(self, saved):
        root, compressed = saved
        name, record = next(iter(compressed.config.reduced_modules.items()))
        rank = record.rank
        target = self._edit_config(root, lambda c: c["reduced_modules"][name].update(rank=rank + 1))
        expected = rf"reduced module '{name}' \(recorded rank {rank + 1}\).*\({rank}, 32\).*\({rank + 1}, 32\)"
        with pytest.raises(ValueError, match=expected):
            tf.AutoModelForSequenceClassification.from_pretrained(target)

    def test_missing_reduction_record_is_refused(self, saved):
        root, compressed = saved
        name = next(iter(compressed.config.reduced_modules))
        target = self._edit_config(root, lambda c: c["reduced_modules"].pop(name))
        with pytest.raises(ValueError, match="lacks weights|do not match"):
            tf.AutoModelForSequenceClassification.from_pretrained(target)

    def test_loading_with_the_wrong_task_class_raises(self, saved):
        root, _ = saved
        with pytest.raises(ValueError, match="load it with the Auto class of that task"):
            tf.AutoModelForCausalLM.from_pretrained(root / "ok")


class TestConfig:
    def test_config_round_trip_and_auto_registration(self, tmp_path):
        config = RMTKDConfig(
            base_config=tf.BertConfig(hidden_size=32, num_attention_heads=4).to_dict(),
            base_architecture="BertModel",
            reduced_modules={
                "encoder.layer.0.attention.self.query": {
                    "kind": "linear",
                    "in_features": 32,
                    "out_features": 32,
                    "rank": 4,
                }
            },
        )
        config.save_pretrained(tmp_path)
        loaded = tf.AutoConfig.from_pretrained(tmp_path)
        assert isinstance(loaded, RMTKDConfig)
        assert loaded.reduced_modules == config.reduced_modules
        assert loaded.hidden_size == 32  # served from the base config
        assert isinstance(loaded.get_base_config(), tf.BertConfig)

    @pytest.mark.parametrize(
        "record,match",
        [
            ({"kind": "attention", "in_features": 4, "out_features": 4, "rank": 2}, "kind` must be one of"),
            ({"kind": "linear", "in_features": 4, "out_features": 4, "rank": 0}, "rank` must be a positive int"),
            ({"kind": "linear", "in_features": 4, "rank": 2}, "missing \\['out_features'\\]"),
            ({"kind": "ffn", "in_features": 4, "out_features": 4, "rank": 2}, "missing \\['producers'\\]"),
            ({"kind": "ffn", "in_features": 4, "out_features": 4, "rank": 2, "producers": []}, "producers` must be"),
            ({"kind": "hidden", "rank": 2, "config_overrides": {"hidden_size": 2}}, "hidden width is `hidden_width`"),
        ],
    )
    def test_bad_records_raise_value_error(self, record, match):
        with pytest.raises(ValueError, match=match):
            RMTKDConfig(
                base_config={"model_type": "bert"}, base_architecture="BertModel", reduced_modules={"m": record}
            )

    def test_provenance_is_recorded(self):
        compressed = hf_rmtkd.compress(tiny_model("bert"), tiny_batches("bert"), progress=False, seed=7)
        calibration = compressed.config.calibration
        assert len(calibration["fingerprint"]) == 64 and calibration["seed"] == 7
        assert calibration["estimator"] == "bema" and calibration["n_tokens"] > 0
        record = compressed.config.reduced_modules["encoder.layer.0.output.dense"]
        assert {"sigma2", "lambda_plus", "n_samples", "estimator", "tau", "dim", "producers"} <= set(record.to_dict())
        assert all(record.to_dict()[key] is not None for key in ("sigma2", "lambda_plus", "n_samples", "estimator"))


def test_non_transformers_model_is_refused_by_compress():
    with pytest.raises(TypeError, match="needs a transformers PreTrainedModel"):
        hf_rmtkd.compress(torch.nn.Linear(4, 4), [torch.randn(3, 4)], progress=False)


def test_peft_model_is_merged_first(caplog):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("bert"), LoraConfig(r=2, target_modules=["query", "value"]))
    with caplog.at_level("WARNING", logger="hf_rmtkd.compression"):
        compressed = hf_rmtkd.compress(model, tiny_batches("bert"), progress=False)
    assert "Merging the PEFT adapters" in caplog.text
    assert type(compressed.model).__name__ == "BertModel"
    assert not any("lora" in n for n, _ in compressed.named_parameters())
