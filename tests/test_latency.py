"""Latency that follows parameters: dense merge where it is faster, GPU-friendly ranks, torch.compile and ONNX export."""

import pytest
import torch
import transformers as tf
from conftest import tiny_config
from torch import nn

from hf_rmtkd import LowRankLinear, RMTKDTrainingArguments, SpectralOptions, compress
from hf_rmtkd.latency import merge_low_rank, optimize_for_latency


def _compressed(family="bert", **options):
    torch.manual_seed(0)
    config = tiny_config(family, num_labels=2)
    config.pad_token_id = 0  # GPT-2 sequence classification needs one; the ids below never use it
    model = tf.AutoModelForSequenceClassification.from_config(config).eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(5, 99, (8, 16), generator=g)} for _ in range(4)]
    return compress(model, batches, progress=False, **options).eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(5, 99, (3, 16), generator=g),
        "attention_mask": torch.ones(3, 16, dtype=torch.long),
    }


def _low_rank_paths(model):
    return [p for p, m in model.model.named_modules() if isinstance(m, LowRankLinear)]


class TestMerge:
    def test_merge_is_exact_and_reloads_dense(self, tmp_path):
        model = _compressed()
        paths = _low_rank_paths(model)
        assert paths, "the tiny model should have factorised layers"
        with torch.no_grad():
            before = model(**_batch()).logits
            assert merge_low_rank(model) == paths
            after = model(**_batch()).logits
        assert torch.allclose(before, after, atol=1e-5)
        assert not _low_rank_paths(model)
        assert all(model.config.reduced_modules[p].merged for p in paths)
        model.save_pretrained(tmp_path)
        reloaded = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
        assert all(type(reloaded.model.get_submodule(p)) is nn.Linear for p in paths)
        with torch.no_grad():
            assert torch.allclose(reloaded(**_batch()).logits, after, atol=1e-5)

    def test_model_card_says_how_each_module_is_stored(self):
        from hf_rmtkd.model_card import build_model_card

        model = _compressed()
        first, *rest = _low_rank_paths(model)
        merge_low_rank(model, [first])
        optimize_for_latency(model, rows=16, repeats=2, names=rest[:1])
        text = str(build_model_card(model))
        assert f"| `{first}` |" in text and "dense (merged) |" in text
        assert "ms dense at 16 rows, cpu)" in text
        assert "dense, narrower" in text  # the FFN sites

    def test_unknown_name_is_refused(self):
        with pytest.raises(ValueError, match="No factorised module"):
            merge_low_rank(_compressed(), ["bert.encoder.layer.0.nothing"])

    def test_optimize_keeps_the_faster_form_and_records_it(self, tmp_path):
        model = _compressed()
        paths = _low_rank_paths(model)
        with torch.no_grad():
            before = model(**_batch()).logits
        decisions = optimize_for_latency(model, rows=64, repeats=5)
        assert set(decisions) == set(paths)
        for path, decision in decisions.items():
            assert decision["merged"] == (decision["dense_ms"] <= decision["factorised_ms"])
            expected = nn.Linear if decision["merged"] else LowRankLinear
            assert type(model.model.get_submodule(path)) is expected
            assert model.config.reduced_modules[path].latency["rows"] == 64
        with torch.no_grad():
            assert torch.allclose(model(**_batch()).logits, before, atol=1e-5)
        model.save_pretrained(tmp_path)
        reloaded = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path)
        assert [type(reloaded.model.get_submodule(p)) for p in paths] == [
            type(model.model.get_submodule(p)) for p in paths
        ]


class TestRankMultiple:
    def test_ranks_are_rounded_up(self):
        plain, rounded = _compressed(), _compressed(rank_multiple=8)
        common = plain.config.reduced_modules.keys() & rounded.config.reduced_modules.keys()
        assert common and any(plain.config.reduced_modules[p].rank % 8 for p in common)  # something to round
        for path, record in rounded.config.reduced_modules.items():
            assert record.rank % 8 == 0 or record.rank == record.dim
        for path in common:
            plain_rank = plain.config.reduced_modules[path].rank
            assert rounded.config.reduced_modules[path].rank == min(
                -(-plain_rank // 8) * 8, plain.config.reduced_modules[path].dim
            )

    def test_min_rank_ratio_floors_every_site(self):
        floored = _compressed(min_rank_ratio=0.5)
        assert floored.config.reduced_modules
        for record in floored.config.reduced_modules.values():
            assert record.rank >= -(-record.dim // 2)
        with pytest.raises(ValueError, match="min_rank_ratio"):
            SpectralOptions(min_rank_ratio=1.0)

    def test_bad_multiple_raises(self, tmp_path):
        with pytest.raises(ValueError, match="rank_multiple"):
            SpectralOptions(rank_multiple=0)
        with pytest.raises(ValueError, match="reduction_rank_multiple"):
            RMTKDTrainingArguments(output_dir=str(tmp_path), reduction_rank_multiple=0)


# Plain sites only, and the hidden width too: a narrower stream in a post-LN encoder and in GPT-2 (whose attention
# keeps its old width).
EXPORTED = [("bert", False), ("bert", True), ("gpt2", True)]


class TestExport:
    @pytest.mark.parametrize(("family", "hidden_width"), EXPORTED)
    def test_torch_compile_graph_matches_eager(self, family, hidden_width):
        # aot_eager traces with dynamo and AOTAutograd without needing a C++ compiler on the test machine.
        model = _compressed(family, hidden_width=hidden_width)
        with torch.no_grad():
            eager = model(**_batch()).logits
            compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(**_batch()).logits
        assert torch.allclose(compiled, eager, atol=1e-5)

    @pytest.mark.parametrize(("family", "hidden_width"), EXPORTED)
    def test_onnx_export_matches_pytorch(self, tmp_path, family, hidden_width):
        import onnxruntime as ort  # a test dependency (setup.py extra "test")

        model = _compressed(family, hidden_width=hidden_width)
        merge_low_rank(model, _low_rank_paths(model)[:2])  # a mix of merged and factorised layers
        batch = _batch()

        class Logits(nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask):
                return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

        path = tmp_path / "model.onnx"
        torch.onnx.export(Logits(model), (batch["input_ids"], batch["attention_mask"]), str(path), dynamo=True)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        (onnx_logits,) = session.run(
            None, dict(zip(names, [batch["input_ids"].numpy(), batch["attention_mask"].numpy()]))
        )
        with torch.no_grad():
            expected = model(**batch).logits
        assert torch.allclose(torch.from_numpy(onnx_logits), expected, atol=1e-4)
