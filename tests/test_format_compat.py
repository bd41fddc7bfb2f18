"""Checkpoints written by hf_rmtkd 0.1.0 (tests/fixtures/v0.1.0, made by make_v010_fixtures.py at d83b606) load
with the current code and give the logits they gave then."""

import json

import pytest
import torch
import transformers as tf
from conftest import REPO_ROOT
from safetensors.torch import load_file

import hf_rmtkd  # noqa: F401  (registers the RMTKD classes)


FIXTURES = REPO_ROOT / "tests" / "fixtures" / "v0.1.0"
AUTO = {
    "bert_sequence_classification": tf.AutoModelForSequenceClassification,
    "bert_merged": tf.AutoModelForSequenceClassification,
    "llama_hidden_width": tf.AutoModelForCausalLM,
    "gpt2_hidden_width": tf.AutoModelForCausalLM,
    "resnet_cifar": tf.AutoModelForImageClassification,
}


@pytest.mark.parametrize("name", sorted(AUTO))
def test_a_010_checkpoint_loads_with_identical_logits(name):
    folder = FIXTURES / name
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "rmtkd" and config["reduced_modules"]  # a real 0.1.0 record, not an empty one
    model = AUTO[name].from_pretrained(folder).eval()
    expected = load_file(folder / "expected.safetensors")
    logits = expected.pop("logits")
    with torch.no_grad():
        assert torch.allclose(model(**expected).logits, logits, atol=1e-5)
