"""int8 on top of RMT-KD: dynamic int8 through PyTorch and through ONNX Runtime, on a compressed model."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from conftest import tiny_batches
from testing_utils import tiny_classifier

import hf_rmtkd
from hf_rmtkd.layers import LowRankLinear
from hf_rmtkd.quantization import export_onnx_int8, quantize_int8


def _compressed():
    return hf_rmtkd.compress(tiny_classifier(), tiny_batches("bert"), progress=False)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _relative(a, b):
    return float((a - b).norm() / b.norm())


def test_int8_copy_is_close_smaller_and_leaves_the_model_alone():
    model = _compressed()
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    batch = tiny_batches("bert", 1, seed=7)[0]
    reference = _logits(model, batch)
    quantized = quantize_int8(model)
    assert _relative(_logits(quantized, batch), reference) < 0.1
    assert torch.equal(_logits(model, batch), reference)  # the float model is unchanged
    kinds = {type(m).__module__ for m in quantized.modules() if "Linear" in type(m).__name__}
    assert any("quantized" in k for k in kinds) and not any(
        isinstance(m, torch.nn.Linear) for m in quantized.modules()
    )
    float_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    int8 = [m for m in quantized.modules() if type(m).__name__ == "Linear" and "quantized" in type(m).__module__]
    int8_bytes = sum(m.weight().numel() * m.weight().element_size() for m in int8)
    assert int8_bytes == float_bytes / 4  # every linear weight, factorised ones included, now one byte per value


def test_an_int8_copy_is_not_saved_but_the_reloaded_checkpoint_quantizes_the_same(tmp_path):
    model = _compressed()
    quantized = quantize_int8(model)
    with pytest.raises(ValueError, match="quantize after loading"):
        quantized.save_pretrained(tmp_path / "int8")
    assert not (tmp_path / "int8" / "config.json").exists()
    model.save_pretrained(tmp_path / "float")
    again = quantize_int8(tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "float"))
    batch = tiny_batches("bert", 1, seed=3)[0]
    torch.testing.assert_close(_logits(again, batch), _logits(quantized, batch), rtol=0, atol=1e-6)


def test_onnx_runtime_int8_matches_pytorch(tmp_path):
    import onnxruntime as ort

    model = _compressed()
    batch = {k: v for k, v in tiny_batches("bert", 1, seed=5)[0].items() if k in ("input_ids", "attention_mask")}
    batch.setdefault("attention_mask", torch.ones_like(batch["input_ids"]))
    float_path, int8_path = export_onnx_int8(model, batch, tmp_path / "model.onnx")
    assert int8_path.stat().st_size < float_path.stat().st_size
    reference = _logits(model, batch)
    for path, tolerance in ((float_path, 1e-4), (int8_path, 0.1)):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (logits,) = session.run(["logits"], {k: v.numpy() for k, v in batch.items()})
        assert _relative(torch.from_numpy(logits), reference) < tolerance, path.name
    # Another batch size and length run through the same file (dynamic axes).
    other = {k: v[:1, :5] for k, v in batch.items()}
    session = ort.InferenceSession(str(int8_path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {k: v.numpy() for k, v in other.items()})
    assert logits.shape == (1, model.config.num_labels)
