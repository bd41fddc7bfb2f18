"""Bad inputs get the right result or a clear error naming the module or argument, and leave the user's model and
files as they were: dead layers, huge activations, re-compression, tokenizers, rows instead of batches, typos,
hand-edited or corrupted checkpoints, PEFT models in `analyze`."""

import gc
import json
import math
import struct

import pytest
import torch
import transformers as tf
from conftest import TEXT_VOCAB, tiny_batches, tiny_model
from torch import nn

import hf_rmtkd
from hf_rmtkd.calibration import batch_sums
from hf_rmtkd.compression import to_rmtkd
from hf_rmtkd.layers import LowRankLinear
from hf_rmtkd.pipeline import apply_report


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _types(model):
    return {name: type(module) for name, module in model.named_modules()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A compressed tiny BERT classifier saved once: (folder, in-memory model)."""
    folder = tmp_path_factory.mktemp("rmtkd")
    compressed = hf_rmtkd.compress(tiny_model("bert", "sequence"), tiny_batches("bert"), progress=False)
    compressed.save_pretrained(folder)
    return folder, compressed


def _copy_checkpoint(folder, destination):
    destination.mkdir()
    for path in folder.iterdir():
        (destination / path.name).write_bytes(path.read_bytes())
    return destination


def _edit_config(folder, edit):
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


# -- 1. dead FFN, transactional surgery ------------------------------------------------------------------------------
class TestDeadLayersAndFailedSurgery:
    def test_dead_ffn_with_select_keeps_the_floor_and_changes_nothing(self):
        model = tiny_model("bert", "sequence")
        dense = model.bert.encoder.layer[1].intermediate.dense
        with torch.no_grad():
            dense.weight.zero_()
            dense.bias.zero_()
        batch = tiny_batches("bert", 1, seed=4)[0]
        reference = _logits(model, batch)
        with pytest.warns(UserWarning, match="layer.1.output.dense"):
            compressed = hf_rmtkd.compress(
                model, tiny_batches("bert"), target_modules=["layer.1.output.dense"], progress=False
            )
        assert compressed.config.reduced_modules["bert.encoder.layer.1.output.dense"].rank == 1
        # The dropped neurons carry nothing: the output is unchanged.
        torch.testing.assert_close(_logits(compressed, batch), reference, rtol=0, atol=1e-5)

    def test_a_failing_later_site_leaves_the_model_as_it_was(self):
        model = tiny_model("bert", "sequence")
        report = hf_rmtkd.analyze(model, tiny_batches("bert"), progress=False)
        # The report goes stale: layer 1's FFN is replaced by a wider one after the analysis.
        layer = model.bert.encoder.layer[1]
        layer.intermediate.dense, layer.output.dense = nn.Linear(32, 40), nn.Linear(40, 32)
        wrapper = to_rmtkd(model)
        state, types = _state(model), _types(model)
        with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.1\.output\.dense.*analy"):
            apply_report(wrapper, report)
        assert _types(model) == types
        after = model.state_dict()
        assert after.keys() == state.keys()
        for key, value in state.items():
            assert torch.equal(after[key], value), key
        assert wrapper.config.reduced_modules == {}


# -- 2. huge float32 activations -------------------------------------------------------------------------------------
class TestHugeActivations:
    def test_batch_sums_of_4e19_float32_activations_are_exact(self):
        x = torch.randn(300, 8, generator=torch.Generator().manual_seed(0)) * 4e19
        outer, total, n = batch_sums(x)
        wide = x.double()
        assert torch.isfinite(outer).all()
        torch.testing.assert_close(outer, wide.T @ wide, rtol=1e-5, atol=0)
        torch.testing.assert_close(total, wide.sum(0))

    def test_model_with_4e19_activations_compresses_to_finite_outputs(self):
        model = tiny_model("bert", "sequence")
        layer = model.bert.encoder.layer[1]
        scale = 4e19
        with torch.no_grad():
            layer.intermediate.dense.weight.mul_(scale)
            layer.intermediate.dense.bias.mul_(scale)
            layer.output.dense.weight.div_(scale)
        batch = tiny_batches("bert", 1, seed=4)[0]
        reference = _logits(model, batch)
        assert torch.isfinite(reference).all()
        compressed = hf_rmtkd.compress(
            model, tiny_batches("bert"), target_modules=["layer.1.output.dense"], progress=False
        )
        record = compressed.config.reduced_modules["bert.encoder.layer.1.output.dense"]
        assert math.isfinite(record.sigma2) and record.sigma2 > 1e30  # was NaN: float32 x x^T overflowed
        assert record.rank > 1
        assert torch.isfinite(_logits(compressed, batch)).all()

    def test_non_finite_sums_name_the_site(self):
        from hf_rmtkd.analysis import analyze_statistics
        from hf_rmtkd.calibration import ActivationStatistics
        from hf_rmtkd.sites import Site

        stats = ActivationStatistics.zeros(4)
        stats.add(torch.randn(50, 4, dtype=torch.float64) * 1e160)  # x x^T overflows float64
        with pytest.raises(ValueError, match="'some.site'.*finite"):
            analyze_statistics(Site("some.site", "linear", 4), stats, hf_rmtkd.SpectralOptions())


# -- 3. compressing twice --------------------------------------------------------------------------------------------
def _nested_low_rank(model):
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, LowRankLinear) and any(isinstance(m, LowRankLinear) for m in module.children())
    ]


class TestCompressTwice:
    def test_compress_twice_on_the_original_object_saves_and_reloads(self, tmp_path):
        model = tiny_model("bert", "sequence")
        batches = tiny_batches("bert")
        first = hf_rmtkd.compress(model, batches, target_modules=["intermediate.dense"], progress=False)
        first_records = set(first.config.reduced_modules)
        second = hf_rmtkd.compress(model, batches, target_modules=["query", "value"], progress=False)
        assert first_records < set(second.config.reduced_modules)
        batch = tiny_batches("bert", 1, seed=4)[0]
        expected = _logits(second, batch)
        second.save_pretrained(tmp_path)
        reloaded = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path)
        torch.testing.assert_close(_logits(reloaded, batch), expected, rtol=0, atol=1e-5)
        # Once the returned models are dropped (a re-run cell), the object still carries its records.
        records = dict(second.config.reduced_modules)
        del first, second
        gc.collect()
        assert to_rmtkd(model).config.reduced_modules == records

    def test_recompressing_the_wrapper_never_nests_low_rank_layers(self, tmp_path):
        batches = tiny_batches("bert")
        compressed = hf_rmtkd.compress(tiny_model("bert", "sequence"), batches, progress=False)
        assert any(isinstance(m, LowRankLinear) for m in compressed.modules())
        again = hf_rmtkd.compress(compressed, batches, progress=False)
        assert not _nested_low_rank(again)
        assert not any(".down" in name or ".up" in name for name in again.config.reduced_modules)
        batch = tiny_batches("bert", 1, seed=4)[0]
        expected = _logits(again, batch)
        again.save_pretrained(tmp_path)
        reloaded = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path)
        torch.testing.assert_close(_logits(reloaded, batch), expected, rtol=0, atol=1e-5)

    def test_a_low_rank_layer_is_re_reduced_to_a_lower_rank(self, tmp_path):
        batches = tiny_batches("bert")
        compressed = hf_rmtkd.compress(
            tiny_model("bert", "sequence"), batches, target_modules=["layer.0.attention.self.query"], progress=False
        )
        path = "bert.encoder.layer.0.attention.self.query"
        rank = compressed.get_submodule(f"model.{path}").rank
        report = hf_rmtkd.analyze(compressed, batches, target_modules=["layer.0.attention.self.query"])
        assert list(report) == [path]
        report[path].rank = rank - 2
        apply_report(compressed, report)
        module = compressed.get_submodule(f"model.{path}")
        assert isinstance(module, LowRankLinear) and module.rank == rank - 2 and not _nested_low_rank(compressed)
        record = compressed.config.reduced_modules[path]
        assert (record.in_features, record.out_features, record.rank) == (32, 32, rank - 2)
        batch = tiny_batches("bert", 1, seed=4)[0]
        expected = _logits(compressed, batch)
        compressed.save_pretrained(tmp_path)
        reloaded = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path)
        torch.testing.assert_close(_logits(reloaded, batch), expected, rtol=0, atol=1e-5)


# -- 4. the tokenizer travels with the checkpoint --------------------------------------------------------------------
def test_tokenizer_of_the_source_folder_is_saved_and_the_pipeline_runs(tmp_path):
    words = ["the", "a", "cat", "dog", "sat", "on", "mat", "good", "bad", "film"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    vocab += [f"w{i}" for i in range(TEXT_VOCAB - len(vocab))]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = tf.BertTokenizerFast(vocab=str(tmp_path / "vocab.txt"))  # transformers 5: `vocab`, a file or dict
    tokenizer.save_pretrained(tmp_path / "source")
    tiny_model("bert", "sequence").save_pretrained(tmp_path / "source")
    model = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "source")
    compressed = hf_rmtkd.compress(model, tiny_batches("bert"), progress=False)
    compressed.save_pretrained(tmp_path / "compressed")
    classify = tf.pipeline("text-classification", model=str(tmp_path / "compressed"))
    assert classify.tokenizer.convert_tokens_to_ids("cat") == vocab.index("cat")
    (result,) = classify("the cat sat on the mat")
    assert result["label"] in compressed.config.id2label.values()


def test_processing_class_argument_is_saved(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "cat"]) + "\n")
    tokenizer = tf.BertTokenizerFast(vocab=str(tmp_path / "vocab.txt"))  # transformers 5: `vocab`, a file or dict
    compressed = hf_rmtkd.compress(
        tiny_model("bert", "sequence"), tiny_batches("bert"), processing_class=tokenizer, progress=False
    )
    compressed.save_pretrained(tmp_path / "out")
    assert tf.AutoTokenizer.from_pretrained(tmp_path / "out").convert_tokens_to_ids("cat") == 5


# -- 5. rows instead of batches, typos, hand-edited configs, PEFT ----------------------------------------------------
class TestSmallerOnes:
    def test_a_datasets_dataset_of_rows_is_refused_with_what_to_do(self):
        import datasets

        rows = datasets.Dataset.from_dict({"input_ids": [[2, 3, 4]] * 4, "attention_mask": [[1, 1, 1]] * 4})
        model = tiny_model("bert", "sequence")
        state = _state(model)
        for call in (hf_rmtkd.analyze, hf_rmtkd.compress):
            with pytest.raises(TypeError, match="DataLoader.*collat"):
                call(model, rows, progress=False)
        with pytest.raises(TypeError, match="DataLoader.*collat"):  # torch-formatted rows: 1-D tensors
            hf_rmtkd.analyze(model, rows.with_format("torch"), progress=False)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())

    def test_a_typo_in_a_target_list_is_named(self):
        with pytest.raises(ValueError, match=r"'qurey'.*matches no module.*query"):
            hf_rmtkd.analyze(tiny_model("bert"), tiny_batches("bert"), target_modules=["query", "qurey"])

    def test_config_without_base_architecture_says_so(self, saved, tmp_path):
        folder = _copy_checkpoint(saved[0], tmp_path / "edited")
        _edit_config(folder, lambda config: config.pop("base_architecture"))
        with pytest.raises(ValueError, match="base_architecture"):
            tf.AutoModelForSequenceClassification.from_pretrained(folder)

    def test_base_config_model_type_edited_by_hand_says_it_does_not_match(self, saved, tmp_path):
        folder = _copy_checkpoint(saved[0], tmp_path / "edited")
        _edit_config(folder, lambda config: config["base_config"].update(model_type="roberta"))
        with pytest.raises(ValueError, match="base config.*does not match.*BertForSequenceClassification"):
            tf.AutoModelForSequenceClassification.from_pretrained(folder)

    def test_analyze_on_a_peft_model_reports_the_sites_compress_reduces(self):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(tiny_model("bert"), LoraConfig(r=2, target_modules=["query", "value"]))
        batches = tiny_batches("bert")
        report = hf_rmtkd.analyze(model, batches, progress=False)
        assert any("lora" in name for name, _ in model.named_parameters())  # analyze left the adapters alone
        _, compressed_report = hf_rmtkd.compress(model, batches, return_report=True, progress=False)
        assert list(report) == list(compressed_report)
        assert [site.rank for site in report.values()] == [site.rank for site in compressed_report.values()]


# -- 6. checkpoint integrity, no pickle, no code execution -----------------------------------------------------------
def _flip_a_weight_byte(path):
    data = bytearray(path.read_bytes())
    header = struct.unpack("<Q", data[:8])[0]
    entries = {k: v for k, v in json.loads(data[8 : 8 + header]).items() if k != "__metadata__"}
    start, end = next(iter(sorted(entries.values(), key=lambda e: -e["data_offsets"][1])))["data_offsets"]
    position = 8 + header + (start + end) // 2
    data[position] ^= 0x01
    path.write_bytes(bytes(data))


class TestCheckpointIntegrity:
    def test_weights_hash_is_recorded_and_a_flipped_byte_is_refused(self, saved, tmp_path):
        folder = _copy_checkpoint(saved[0], tmp_path / "corrupt")
        digest = json.loads((folder / "config.json").read_text())["weights_sha256"]
        assert len(digest) == 64 and int(digest, 16) >= 0
        _flip_a_weight_byte(folder / "model.safetensors")
        with pytest.raises(ValueError, match=r"model\.safetensors.*sha256"):
            tf.AutoModelForSequenceClassification.from_pretrained(folder)

    def test_checkpoint_without_a_hash_loads(self, saved, tmp_path):
        folder = _copy_checkpoint(saved[0], tmp_path / "old")
        _edit_config(folder, lambda config: config.pop("weights_sha256"))
        batch = tiny_batches("bert", 1, seed=4)[0]
        loaded = tf.AutoModelForSequenceClassification.from_pretrained(folder)
        torch.testing.assert_close(_logits(loaded, batch), _logits(saved[1], batch), rtol=0, atol=1e-5)

    def test_the_format_never_uses_pickle(self, saved, monkeypatch):
        folder = saved[0]
        assert {p.suffix for p in folder.iterdir()} <= {".json", ".safetensors", ".py", ".md", ".txt"}

        def refuse(*args, **kwargs):
            raise AssertionError("torch.load (pickle) was called")

        monkeypatch.setattr(torch, "load", refuse)
        tf.AutoModelForSequenceClassification.from_pretrained(folder)

    def test_loading_without_trust_remote_code_runs_no_code_from_the_folder(self, saved, tmp_path):
        folder = _copy_checkpoint(saved[0], tmp_path / "hostile")
        marker = tmp_path / "executed"
        for name in ("modeling_rmtkd.py", "configuration_rmtkd.py"):
            (folder / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
        tf.AutoModelForSequenceClassification.from_pretrained(folder)
        tf.AutoConfig.from_pretrained(folder)
        assert not marker.exists()
