"""sentence-transformers in and out, on a tiny BERT SentenceTransformer (Transformer + Pooling + Normalize)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import transformers as tf
from conftest import tiny_config
from testing_utils import WORDS, word_tokenizer

import hf_rmtkd  # noqa: F401  (registers the RMTKD Auto classes)
from hf_rmtkd.sentence_models import compress_sentence_transformer


st = pytest.importorskip("sentence_transformers")
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer  # noqa: E402


def _sentences(n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, 6)) for _ in range(n)]


@pytest.fixture
def saved_st(tmp_path):
    torch.manual_seed(0)
    config = tiny_config("bert")
    config.vocab_size = len(WORDS) + 5
    tf.BertModel(config).save_pretrained(tmp_path / "bert")
    word_tokenizer(tmp_path / "bert").save_pretrained(tmp_path / "bert")
    transformer = Transformer(str(tmp_path / "bert"))
    model = st.SentenceTransformer(modules=[transformer, Pooling(config.hidden_size), Normalize()], device="cpu")
    model.save(str(tmp_path / "st"))
    return tmp_path / "st"


def test_compressed_sentence_transformer_saves_and_loads_with_the_same_modules(saved_st, tmp_path):
    original = st.SentenceTransformer(str(saved_st), device="cpu")
    compressed = compress_sentence_transformer(str(saved_st), _sentences(64, 0), progress=False)
    assert type(compressed[0].model).__name__ == "RMTKDModel" and compressed[0].model.config.reduced_modules
    assert compressed[0].model.num_parameters() < original[0].model.num_parameters()
    probe = _sentences(5, 1)
    expected = compressed.encode(probe, convert_to_tensor=True)
    compressed.save(str(tmp_path / "out"))
    reloaded = st.SentenceTransformer(str(tmp_path / "out"), device="cpu")
    assert [type(m).__name__ for m in reloaded] == [type(m).__name__ for m in original] == [
        "Transformer", "Pooling", "Normalize"
    ]  # fmt: skip
    torch.testing.assert_close(reloaded.encode(probe, convert_to_tensor=True), expected, rtol=0, atol=1e-6)
    assert torch.allclose(expected.norm(dim=1), torch.ones(5), atol=1e-5)  # Normalize kept


def test_hidden_width_and_options_reach_the_embedding_model(saved_st):
    model = st.SentenceTransformer(str(saved_st), device="cpu")
    compress_sentence_transformer(model, _sentences(64, 0), progress=False, hidden_width=True, target_modules=[])
    assert model[0].model.config.hidden_width is not None
    assert model.encode(["good film"]).shape[1] < 32  # the pooled embedding is the narrower stream


def test_loads_with_trust_remote_code_without_hf_rmtkd(saved_st, tmp_path):
    compressed = compress_sentence_transformer(str(saved_st), _sentences(64, 0), progress=False)
    compressed.save(str(tmp_path / "out"))
    expected = compressed.encode(["good film"], convert_to_tensor=True)
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_rmtkd"] = None
        import torch
        from sentence_transformers import SentenceTransformer
        model = SentenceTransformer({str(tmp_path / "out")!r}, device="cpu", trust_remote_code=True)
        got = model.encode(["good film"], convert_to_tensor=True)
        torch.testing.assert_close(got, torch.load({str(tmp_path / "expected.pt")!r}), rtol=0, atol=1e-6)
        print("ST-REMOTE-OK", type(model[0].model).__module__)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ST-REMOTE-OK transformers_modules" in result.stdout


def test_empty_calibration_is_refused(saved_st):
    with pytest.raises(ValueError, match="`sentences` is empty"):
        compress_sentence_transformer(str(saved_st), ["", ""], progress=False)
