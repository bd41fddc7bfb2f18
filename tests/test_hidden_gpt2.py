"""The hidden-width site on tiny GPT-2 models: LayerNorm decoders sliced exactly up to the dropped directions."""

import pytest
import torch
import transformers as tf
from conftest import tiny_config

from hf_rmtkd import compress
from hf_rmtkd.hidden import centred_statistics, mean_aligned_basis, residual_statistics
from hf_rmtkd.hidden.gpt2 import slice_gpt2
from hf_rmtkd.records import HIDDEN_SITE


CLASSES = (tf.GPT2LMHeadModel, tf.GPT2ForSequenceClassification, tf.GPT2ForTokenClassification)
D = 32  # tiny_config("gpt2").n_embd


def _config():
    config = tiny_config("gpt2")
    config.pad_token_id = 0  # sequence classification with batches > 1; the ids below never use it
    return config


def _model(cls=tf.GPT2LMHeadModel, seed=0):
    """Non-trivial LayerNorm weights and biases, so folding them into the readers is exercised."""
    torch.manual_seed(seed)
    model = cls(_config()).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.3)
    return model


def _planted(cls=tf.GPT2LMHeadModel, k=11, seed=0):
    """A GPT-2 whose centred residual stream lies in a k-dim subspace orthogonal to 1 (any mean is allowed: every
    writer is projected onto that subspace plus the all-ones direction)."""
    model = _model(cls, seed)
    ones = torch.full((D, 1), D**-0.5)
    raw = torch.randn(D, k, generator=torch.Generator().manual_seed(seed + 1))
    basis, _ = torch.linalg.qr(raw - ones @ (ones.T @ raw))
    projector = basis @ basis.T + ones @ ones.T
    base = model.transformer
    with torch.no_grad():
        for embedding in (base.wte, base.wpe):
            embedding.weight.copy_(embedding.weight @ projector)
        for block in base.h:
            for writer in (block.attn.c_proj, block.mlp.c_proj):  # Conv1D: out = h @ W + b
                writer.weight.copy_(writer.weight @ projector)
                writer.bias.copy_(writer.bias @ projector)
    return model, basis


def _ids(seed=0):
    return torch.randint(2, 99, (3, 10), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


class TestSlicing:
    @pytest.mark.parametrize("cls", CLASSES)
    def test_a_rotation_of_the_full_stream_is_the_same_function(self, cls):
        model = _model(cls)
        rotation, _ = torch.linalg.qr(
            torch.randn(D, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        )
        basis = mean_aligned_basis(rotation, D)
        assert torch.allclose(basis.T @ basis, torch.eye(D, dtype=torch.float64), atol=1e-10)
        sliced, overrides = slice_gpt2(model, basis)
        assert overrides["n_inner"] == 37 and overrides["tie_word_embeddings"] is False
        assert torch.allclose(_logits(sliced, _ids()), _logits(model, _ids()), atol=1e-5)

    def test_slicing_is_exact_when_the_centred_stream_lies_in_the_subspace(self):
        model, planted = _planted(k=11)
        basis = mean_aligned_basis(torch.linalg.qr(torch.cat([planted, torch.randn(D, D - 11)], 1))[0], 12)
        sliced, overrides = slice_gpt2(model, basis.to(torch.float64))
        assert overrides["n_embd"] == 12 and overrides["layer_norm_epsilon"] == pytest.approx(1e-5 * D / 12)
        # The attention keeps its width and heads; only its input and output follow the stream.
        attention = sliced.transformer.h[0].attn
        assert (attention.head_dim, attention.c_attn.weight.shape, attention.c_proj.weight.shape) == (
            8,
            (12, 3 * D),
            (D, 12),
        )
        assert sliced.num_parameters() < model.num_parameters()
        assert torch.allclose(_logits(sliced, _ids()), _logits(model, _ids()), atol=1e-4)
        # A subspace that misses part of the stream changes the outputs: the test can fail.
        other = mean_aligned_basis(torch.linalg.qr(torch.randn(D, D, dtype=torch.float64))[0], 12)
        assert not torch.allclose(_logits(slice_gpt2(model, other)[0], _ids()), _logits(model, _ids()), atol=1e-2)

    def test_the_centred_statistics_see_the_planted_rank(self):
        model, _ = _planted(k=11)
        pooled, _ = residual_statistics(model, [{"input_ids": _ids(s)} for s in range(4)], None, False)
        raw = torch.linalg.eigvalsh(pooled.covariance(centered=False)).flip(0)
        centred = torch.linalg.eigvalsh(centred_statistics(pooled).covariance(centered=False)).flip(0)
        # The uncentred stream also spans the all-ones direction; centring removes exactly that one.
        assert (raw > raw[0] * 1e-5).sum() == 12 and (centred > centred[0] * 1e-5).sum() == 11


class TestCompress:
    def test_mp_rule_finds_the_planted_width_and_the_checkpoint_reloads(self, tmp_path):
        model, _ = _planted(k=11)
        expected = _logits(model, _ids())
        batches = [{"input_ids": _ids(s)} for s in range(1, 9)]
        compressed = compress(model, batches, target_modules=[], hidden_width=True, progress=False)
        record = compressed.config.hidden_width
        assert (record.dim, record.rank, record.signal_rank, record.attention_width) == (D, 12, 11, D)
        assert torch.allclose(_logits(compressed, _ids()), expected, atol=1e-4)
        compressed.save_pretrained(tmp_path)
        reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert reloaded.config.hidden_size == 12 and reloaded.model.transformer.h[1].attn.head_dim == 8
        assert torch.allclose(_logits(reloaded, _ids()), expected, atol=1e-4)
        generated = reloaded.generate(_ids()[:1], max_new_tokens=4, do_sample=False)
        assert generated.shape == (1, 14)

    def test_a_task_checkpoint_reloads_as_the_base_model_and_other_sites_reduce_after(self, tmp_path):
        model, _ = _planted(tf.GPT2ForSequenceClassification, k=11)
        batches = [{"input_ids": _ids(s)} for s in range(1, 9)]
        compressed = compress(model, batches, hidden_width=True, progress=False)
        assert len(compressed.config.reduced_modules) > 1
        compressed.save_pretrained(tmp_path)
        reloaded = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
        assert torch.allclose(_logits(reloaded, _ids()), _logits(compressed, _ids()), atol=1e-5)
        base = tf.AutoModel.from_pretrained(tmp_path).eval()
        with torch.no_grad():
            hidden = compressed.model.transformer(_ids()).last_hidden_state
            assert torch.allclose(base(_ids()).last_hidden_state, hidden, atol=1e-5)

    def test_unsupported_gpt2_heads_are_refused(self):
        with pytest.raises(TypeError, match="GPT2DoubleHeadsModel"):
            compress(tf.GPT2DoubleHeadsModel(_config()), [{"input_ids": _ids()}], hidden_width=True, progress=False)


def test_hidden_width_is_the_first_scheduled_reduction_on_gpt2(tmp_path):
    from testing_utils import hidden_trainer_args, lm_dataset

    from hf_rmtkd import RMTKDTrainer

    args = hidden_trainer_args(tmp_path / "run")
    trainer = RMTKDTrainer(model=_planted()[0], args=args, train_dataset=lm_dataset())
    trainer.train()
    history = trainer.reduction_callback.history
    assert history[0]["reduced"] == [HIDDEN_SITE] and trainer.model.model.config.n_embd == 12
    trainer.save_model(tmp_path / "final")
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    trainer.model.eval()
    assert torch.allclose(_logits(reloaded, _ids()), _logits(trainer.model, _ids()), atol=1e-5)
