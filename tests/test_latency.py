"""Latency that follows parameters: dense merge where it is faster, GPU-friendly ranks, torch.compile and ONNX export."""

import copy
import time

import pytest
import torch
import transformers as tf
from conftest import tiny_config
from testing_utils import random_images, tiny_resnet
from torch import nn

from hf_rmtkd import LowRankConv2d, LowRankLinear, RMTKDTrainingArguments, SpectralOptions, compress
from hf_rmtkd.latency import dense_from_low_rank, merge_low_rank, optimize_for_latency, time_round_robin_ms


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


class _Sleeps(nn.Module):
    """Sleeps `seconds` per forward and logs its name, so the order and the ratio of the timings are known."""

    def __init__(self, name, seconds, log):
        super().__init__()
        self.name, self.seconds, self.log = name, seconds, log

    def forward(self, x):
        self.log.append(self.name)
        time.sleep(self.seconds)
        return x


class TestRoundRobin:
    def test_modules_are_timed_in_turn_and_the_slower_one_measures_slower(self):
        log = []
        modules = {"fast": _Sleeps("fast", 0.001, log), "slow": _Sleeps("slow", 0.02, log)}
        ms = time_round_robin_ms(modules, torch.zeros(1), repeats=4, warmup=1)
        # Five rounds, each running both modules in the order given: drift falls on both alike.
        assert log == ["fast", "slow"] * 5
        assert set(ms) == {"fast", "slow"}
        assert ms["fast"] >= 1.0 and ms["slow"] >= 20.0 and ms["slow"] > 3 * ms["fast"]

    def test_keyword_inputs_reach_every_module(self):
        model = _compressed().eval()
        modules, batch, seen = {"a": model, "b": dense_model(model)}, _batch(), []
        for name, module in modules.items():
            module.register_forward_pre_hook(
                lambda _, args, kwargs, name=name: seen.append((name, args, sorted(kwargs))), with_kwargs=True
            )
        ms = time_round_robin_ms(modules, batch, repeats=2, warmup=1)
        assert all(v > 0 for v in ms.values())
        # Every forward got the batch as keywords, none positionally.
        assert seen == [(name, (), ["attention_mask", "input_ids"]) for _ in range(3) for name in ("a", "b")]

    @pytest.mark.parametrize("modules,repeats,match", [({}, 3, "at least one"), ({"a": nn.Identity()}, 0, "repeats")])
    def test_bad_arguments_are_refused(self, modules, repeats, match):
        with pytest.raises(ValueError, match=match):
            time_round_robin_ms(modules, torch.zeros(1), repeats=repeats)


def dense_model(model):
    """A copy of `model` with every factorised layer merged back to dense."""
    merged = copy.deepcopy(model)
    merge_low_rank(merged)
    return merged


def _factorised_resnet():
    model = tiny_resnet()
    return compress(model, [random_images(64, seed=2)], convolutions="factorize", progress=False).eval()


def _conv_paths(model):
    return [p for p, m in model.model.named_modules() if isinstance(m, LowRankConv2d)]


class TestConvolutionMerge:
    def test_dense_product_keeps_the_geometry_and_the_output(self):
        torch.manual_seed(0)
        conv = nn.Conv2d(6, 10, 3, stride=2, padding=1, dilation=1, bias=False)
        low = LowRankConv2d.like(conv, rank=3, bias=True)
        nn.init.normal_(low.up.bias)
        dense = dense_from_low_rank(low)
        assert type(dense) is nn.Conv2d and dense.weight.shape == (10, 6, 3, 3)
        assert (dense.stride, dense.padding, dense.bias is not None) == ((2, 2), (1, 1), True)
        images = torch.randn(2, 6, 9, 9)
        torch.testing.assert_close(dense(images), low(images), rtol=0, atol=1e-5)
        with pytest.raises(TypeError, match="LowRankLinear or LowRankConv2d"):
            dense_from_low_rank(conv)

    def test_merged_convolutions_are_exact_reload_dense_and_say_so(self, tmp_path):
        from hf_rmtkd.model_card import reduced_module_rows

        model = _factorised_resnet()
        paths = _conv_paths(model)
        assert len(paths) >= 2, "the tiny ResNet should have factorised convolutions"
        images = random_images(seed=3)
        with torch.no_grad():
            before = model(images).logits
        assert merge_low_rank(model, paths[:1]) == paths[:1]
        with torch.no_grad():
            torch.testing.assert_close(model(images).logits, before, rtol=0, atol=1e-5)
        assert type(model.model.get_submodule(paths[0])) is nn.Conv2d
        model.save_pretrained(tmp_path)
        reloaded = tf.AutoModelForImageClassification.from_pretrained(tmp_path).eval()
        assert type(reloaded.model.get_submodule(paths[0])) is nn.Conv2d
        assert isinstance(reloaded.model.get_submodule(paths[1]), LowRankConv2d)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(images).logits, before, rtol=0, atol=1e-5)
        forms = {row["name"]: row["form"] for row in reduced_module_rows(reloaded.config)}
        assert forms[paths[0]] == "dense convolution (merged)"
        assert forms[paths[1]] == "factorised convolution"

    def test_optimize_times_each_convolution_on_the_feature_map_it_sees(self, tmp_path):
        model = _factorised_resnet()
        paths = _conv_paths(model)
        with pytest.raises(ValueError, match="example_inputs"):
            optimize_for_latency(model, repeats=1)
        images = random_images(n=1, seed=3)
        with torch.no_grad():
            before = model(images).logits
        decisions = optimize_for_latency(model, repeats=3, example_inputs={"pixel_values": images})
        assert set(decisions) == set(paths)
        shapes = {path: decision["input_shape"] for path, decision in decisions.items()}
        # The tiny ResNet's stages hold 8 x 8, 4 x 4 and 2 x 2 maps of 4, 8 and 16 channels (batch 1); a stage's
        # first conv1 strides down from the previous stage's map.
        maps = {1: [4, 8, 8], 2: [8, 4, 4], 3: [16, 2, 2]}
        for path, shape in shapes.items():
            stage = int(path[len("layer")])
            source = stage - 1 if path.endswith("0.conv1") and stage > 1 else stage
            assert shape == [1, *maps[source]], path
        for path, decision in decisions.items():
            assert decision["merged"] == (decision["dense_ms"] <= decision["factorised_ms"])
            assert "rows" not in decision
            expected = nn.Conv2d if decision["merged"] else LowRankConv2d
            assert type(model.model.get_submodule(path)) is expected
            assert model.config.reduced_modules[path].latency == decision
        assert model.training is False
        with torch.no_grad():
            torch.testing.assert_close(model(images).logits, before, rtol=0, atol=1e-5)
        model.save_pretrained(tmp_path)
        reloaded = tf.AutoModelForImageClassification.from_pretrained(tmp_path)
        assert [type(reloaded.model.get_submodule(p)) for p in paths] == [
            type(model.model.get_submodule(p)) for p in paths
        ]

    def test_example_inputs_must_be_keyword_inputs(self):
        with pytest.raises(ValueError, match="`example_inputs` must be a dict"):
            optimize_for_latency(_factorised_resnet(), repeats=1, example_inputs=random_images(n=1))


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
