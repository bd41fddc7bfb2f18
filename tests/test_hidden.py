"""The hidden-width site on tiny Llama decoders: exact when the residual stream lives in the kept subspace."""

import pytest
import torch
import transformers as tf
from conftest import tiny_config
from testing_utils import hidden_trainer_args, lm_dataset, planted_llama, token_ids

from hf_rmtkd import compress
from hf_rmtkd.hidden import slice_hidden
from hf_rmtkd.records import HIDDEN_SITE


def _llama(seed=0):
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(tiny_config("llama")).eval()


_planted, _ids = planted_llama, token_ids


class TestSlicing:
    def test_a_rotation_of_the_full_stream_is_the_same_function(self):
        model = _llama()
        rotation, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(3)))
        rotated, overrides = slice_hidden(model, rotation)
        assert overrides["hidden_size"] == 32 and overrides["head_dim"] == 8
        with torch.no_grad():
            assert torch.allclose(rotated(_ids()).logits, model(_ids()).logits, atol=1e-4)

    def test_slicing_is_exact_when_the_stream_lies_in_the_subspace(self):
        model, basis = _planted(k=12)
        sliced, overrides = slice_hidden(model, basis)
        assert sliced.config.hidden_size == 12 and overrides["rms_norm_eps"] == pytest.approx(
            model.config.rms_norm_eps * 32 / 12
        )
        assert sliced.num_parameters() < model.num_parameters()
        with torch.no_grad():
            assert torch.allclose(sliced(_ids()).logits, model(_ids()).logits, atol=1e-4)
        # A subspace that misses part of the stream changes the outputs: the test can fail.
        other, _ = torch.linalg.qr(torch.randn(32, 12, generator=torch.Generator().manual_seed(9)))
        with torch.no_grad():
            assert not torch.allclose(slice_hidden(model, other)[0](_ids()).logits, model(_ids()).logits, atol=1e-2)


class TestCompress:
    def test_mp_rule_finds_the_planted_width_and_the_checkpoint_reloads(self, tmp_path):
        model, _ = _planted(k=12)
        with torch.no_grad():
            expected = model(_ids()).logits
        batches = [{"input_ids": _ids(s)} for s in range(1, 9)]
        compressed = compress(model, batches, target_modules=[], hidden_width=True, progress=False)
        record = compressed.config.hidden_width
        assert (record.kind, record.dim, record.rank) == ("hidden", 32, 12)
        with torch.no_grad():
            assert torch.allclose(compressed(_ids()).logits, expected, atol=1e-4)
        compressed.save_pretrained(tmp_path)
        reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert reloaded.model.config.hidden_size == 12 and reloaded.config.hidden_size == 12
        with torch.no_grad():
            assert torch.allclose(reloaded(_ids()).logits, expected, atol=1e-4)
        generated = reloaded.generate(_ids()[:1], max_new_tokens=4, do_sample=False)
        assert generated.shape == (1, 14)
        from hf_rmtkd.model_card import build_model_card

        assert f"| `{HIDDEN_SITE}` | hidden | 32 -> 12 |" in str(build_model_card(reloaded))

    def test_then_the_other_sites_reduce_on_the_narrow_model(self, tmp_path):
        model, _ = _planted(k=12)
        batches = [{"input_ids": _ids(s)} for s in range(1, 9)]
        compressed = compress(model, batches, hidden_width=True, progress=False)
        assert len(compressed.config.reduced_modules) > 1
        compressed.save_pretrained(tmp_path)
        reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        with torch.no_grad():
            assert torch.allclose(reloaded(_ids()).logits, compressed(_ids()).logits, atol=1e-5)

    def test_unsupported_family_and_wrong_order_are_refused(self):
        distilbert = tf.DistilBertModel(tiny_config("distilbert"))  # a post-LN layout of its own: not supported
        batches = [{"input_ids": _ids()}]
        with pytest.raises(TypeError, match=r"model_type 'distilbert'.*registered model types: \[.*'llama'"):
            compress(distilbert, batches, hidden_width=True, progress=False)
        reduced = compress(_llama(), batches * 4, progress=False)
        with pytest.raises(ValueError, match="hidden width must be reduced before"):
            compress(reduced, batches * 4, hidden_width=True, progress=False)


class TestTrainer:
    _data = staticmethod(lm_dataset)

    def test_hidden_width_is_the_first_scheduled_reduction_and_resumes(self, tmp_path):
        from hf_rmtkd import RMTKDTrainer

        full = RMTKDTrainer(
            model=_planted()[0], args=hidden_trainer_args(tmp_path / "full"), train_dataset=self._data()
        )
        start = full.model.num_parameters()
        full.train()
        history = full.reduction_callback.history
        assert history[0]["reduced"] == [HIDDEN_SITE] and history[0]["params_after"] < start
        assert full.model.model.config.hidden_size == full.model.config.hidden_width.rank < 32
        assert len(history) >= 2  # then the layers, on the narrow model
        full.save_model(tmp_path / "final")
        reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
        full.model.eval()
        with torch.no_grad():
            assert torch.allclose(reloaded(_ids()).logits, full.model(_ids()).logits, atol=1e-5)

        class StopAt3(tf.TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                control.should_training_stop = state.global_step >= 3

        saving = dict(save_strategy="steps", save_steps=2)
        cut_args = hidden_trainer_args(tmp_path / "cut", **saving)
        RMTKDTrainer(model=_planted()[0], args=cut_args, train_dataset=self._data(), callbacks=[StopAt3()]).train()
        resumed = RMTKDTrainer(model=_planted()[0], args=cut_args, train_dataset=self._data())
        resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))
        assert resumed.model.config.reduced_modules.keys() == full.model.config.reduced_modules.keys()
        a, b = full.model.state_dict(), resumed.model.state_dict()
        assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_hidden_width_only_compress_records_provenance_and_its_spectrum(tmp_path):
    model, _ = _planted(k=12)
    batches = [{"input_ids": _ids(s)} for s in range(1, 9)]
    compressed = compress(model, batches, target_modules=[], hidden_width=True, progress=False, seed=3)
    calibration = compressed.config.calibration
    assert len(calibration["fingerprint"]) == 64 and calibration["n_tokens"] == 240
    assert calibration["estimator"] == "bema" and calibration["seed"] == 3 and calibration["bulk_fraction"] == 0.2
    assert HIDDEN_SITE in compressed.rmtkd_spectra
    from hf_rmtkd.hub import write_spectrum_plots

    assert write_spectrum_plots(compressed, tmp_path) and list((tmp_path / "spectra").glob("*.png"))


def test_a_new_family_is_one_registry_entry(monkeypatch):
    from hf_rmtkd.hidden import FAMILIES, family_for, register_family
    from hf_rmtkd.hidden.llama import LlamaFamily

    monkeypatch.setattr("hf_rmtkd.hidden.family.FAMILIES", dict(FAMILIES))
    model = _llama()
    model.config.model_type = "my_llama"  # as a new model type that shares Llama's layout would be
    with pytest.raises(TypeError, match="'my_llama'"):
        family_for(model)

    class MyLlama(LlamaFamily):
        model_types = ("my_llama",)

    register_family(MyLlama())
    assert isinstance(family_for(model), MyLlama)
    compressed = compress(model, [{"input_ids": _ids()}] * 4, hidden_width=True, target_modules=[], progress=False)
    assert compressed.config.hidden_width.rank < 32
