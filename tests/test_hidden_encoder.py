"""The hidden-width site on tiny post-LN encoders: exact where the approximation has nothing to approximate."""

import pytest
import torch
import transformers as tf
from conftest import tiny_config

from hf_rmtkd import compress
from hf_rmtkd.hidden import residual_statistics
from hf_rmtkd.hidden.encoder import align_mean_direction, align_to_coordinates, slice_encoder
from hf_rmtkd.records import HIDDEN_SITE


CASES = [
    ("bert", tf.BertForSequenceClassification),
    ("bert", tf.BertForTokenClassification),
    ("bert", tf.BertModel),
    ("roberta", tf.RobertaForSequenceClassification),
    ("mpnet", tf.MPNetForSequenceClassification),
]


def _ids(seed=0, batch=4):
    return torch.randint(3, 99, (batch, 12), generator=torch.Generator().manual_seed(seed))


def _batches():
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[0, 8:] = 0  # padded tokens must not enter the statistics or the norm fit
    return [{"input_ids": _ids(s), "attention_mask": mask} for s in range(1, 9)]


def _output(model, ids):
    out = model(ids)
    return (
        out.logits if hasattr(out, "logits") else torch.cat([out.last_hidden_state.flatten(1), out.pooler_output], 1)
    )


def _model(family, cls, seed=0, norm_weights=None):
    torch.manual_seed(seed)
    model = cls(tiny_config(family)).eval()
    if norm_weights is not None:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.LayerNorm):
                    module.weight.uniform_(*norm_weights)
                    module.bias.normal_(0, 0.1)
    return model


def _slice(model, basis):
    _, states = residual_statistics(model, _batches(), None, False)
    return slice_encoder(model, basis, states, _batches(), None, False)


class TestSlicing:
    @pytest.mark.parametrize(("family", "cls"), CASES)
    def test_the_identity_basis_is_the_same_function(self, family, cls):
        # Every approximated part (norm fit, head refactorisation, tanh-unit selection) is exact at k = d.
        model = _model(family, cls, norm_weights=(0.5, 1.5))
        sliced, overrides = _slice(model, torch.eye(32, dtype=torch.float64))
        assert overrides == {"hidden_size": 32}
        with torch.no_grad():
            assert torch.allclose(_output(sliced, _ids()), _output(model, _ids()), atol=1e-5)

    @pytest.mark.parametrize(("family", "cls"), CASES[:1] + CASES[3:])
    def test_a_rotation_is_exact_with_unit_norm_weights(self, family, cls):
        # With unit LayerNorm weights, centring is the only part that does not commute with a rotation, and the
        # mean-direction alignment makes it commute: the rotated model is the same function.
        model = _model(family, cls)
        rotation, _ = torch.linalg.qr(
            torch.randn(32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        )
        sliced, _ = _slice(model, rotation)
        with torch.no_grad():
            assert torch.allclose(_output(sliced, _ids()), _output(model, _ids()), atol=1e-5)

    def test_alignments_keep_the_subspace(self):
        basis, _ = torch.linalg.qr(
            torch.randn(32, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        )
        aligned = align_mean_direction(align_to_coordinates(basis))
        assert torch.allclose(aligned.T @ aligned, torch.eye(12, dtype=torch.float64), atol=1e-10)
        assert torch.allclose(aligned @ aligned.T, basis @ basis.T, atol=1e-10)  # same projector
        ones = aligned.T @ torch.ones(32, dtype=torch.float64)
        assert torch.allclose(ones, ones.mean().expand(12), atol=1e-10)  # 1_d projects onto the direction of 1_k

    def test_fewer_dimensions_cost_more(self):
        # Not exact below d (norm weights, head size and pooler units are approximated), but the MP eigenbasis
        # degrades gracefully: a wider slice is closer to the teacher, and a random subspace is much worse.
        model = _model("bert", tf.BertForSequenceClassification, norm_weights=(0.8, 1.2))
        pooled, _ = residual_statistics(model, _batches(), None, False)
        eigenvectors = torch.linalg.eigh(pooled.covariance(centered=False))[1].flip(-1)
        with torch.no_grad():
            reference = _output(model, _ids())
            errors = {k: (_output(_slice(model, eigenvectors[:, :k])[0], _ids()) - reference).norm() for k in (16, 28)}
            random, _ = torch.linalg.qr(
                torch.randn(32, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
            )
            random_error = (_output(_slice(model, random)[0], _ids()) - reference).norm()
        assert errors[28] < errors[16] < random_error

    def test_head_count_and_unsupported_heads_are_checked(self):
        model = _model("bert", tf.BertForSequenceClassification)
        with pytest.raises(ValueError, match="multiple of the 4 attention heads"):
            _slice(model, torch.eye(32, dtype=torch.float64)[:, :10])
        with pytest.raises(TypeError, match="supports the base model with a pooler"):
            _slice(tf.BertForMaskedLM(tiny_config("bert")), torch.eye(32, dtype=torch.float64))


class TestCompress:
    def test_compress_reloads_with_auto_classes_and_reduces_the_other_sites_after(self, tmp_path):
        model = _model("bert", tf.BertForSequenceClassification, norm_weights=(0.8, 1.2))
        batches = iter(_batches())  # a one-shot iterator: the encoder needs two passes, compress keeps them
        compressed = compress(model, batches, hidden_width=True, progress=False)
        record = compressed.config.hidden_width
        width = compressed.model.config.hidden_size
        assert record.rank == width < 32 and width % 4 == 0
        assert compressed.model.bert.encoder.layer[0].attention.self.attention_head_size == width // 4
        assert len(compressed.config.reduced_modules) > 1
        compressed.save_pretrained(tmp_path)
        reloaded = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
        compressed.eval()
        with torch.no_grad():
            assert torch.allclose(reloaded(_ids()).logits, compressed(_ids()).logits, atol=1e-5)


class TestTrainer:
    def test_hidden_width_is_scheduled_first_on_an_encoder(self, tmp_path):
        from datasets import Dataset
        from testing_utils import hidden_trainer_args

        from hf_rmtkd import RMTKDTrainer

        ids = torch.randint(3, 99, (32, 12), generator=torch.Generator().manual_seed(0))
        data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 3).tolist()})
        args = hidden_trainer_args(tmp_path)
        model = _model("bert", tf.BertForSequenceClassification, norm_weights=(0.8, 1.2))
        trainer = RMTKDTrainer(model=model, args=args, train_dataset=data)
        trainer.train()
        history = trainer.reduction_callback.history
        assert history[0]["reduced"] == [HIDDEN_SITE] and len(history) >= 2
        trainer.save_model(tmp_path / "final")
        reloaded = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "final").eval()
        assert reloaded.config.hidden_size < 32
        trainer.model.eval()
        with torch.no_grad():
            assert torch.allclose(reloaded(_ids()).logits, trainer.model(_ids()).logits, atol=1e-5)
