"""Representation distillation terms: pure functions, and through the kept basis of real sliced models."""

import copy

import pytest
import torch
import transformers as tf
from conftest import tiny_config
from testing_utils import random_images, tiny_resnet

from hf_rmtkd.hidden.encoder import encoder_basis
from hf_rmtkd.hidden.gpt2 import slice_gpt2
from hf_rmtkd.kept_basis import StreamMap, add_stream_map, map_between, map_from
from hf_rmtkd.representation import (
    ENERGY_FLOOR,
    attention_loss,
    count_items,
    energy_floor,
    hidden_state_loss,
    layer_map,
)


def _states(batch=3, positions=5, width=8, layers=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, positions, width, generator=g) for _ in range(layers + 1))


def _attentions(batch=3, heads=2, positions=5, layers=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, positions, positions, generator=g).softmax(-1) for _ in range(layers))


class TestPureFunctions:
    def test_layer_map_is_the_identity_at_equal_depth_and_uniform_otherwise(self):
        assert layer_map(6, 6) == list(range(6))
        assert layer_map(3, 6) == [1, 3, 5]  # last to last
        with pytest.raises(ValueError, match="Layer counts"):
            layer_map(0, 3)

    def test_hidden_term_is_zero_for_equal_states_and_positive_otherwise(self):
        states, labels = _states(), torch.tensor([0, 1, 0])
        assert hidden_state_loss(states, states, labels, 3).abs() < 1e-7
        other = _states(seed=1)
        assert hidden_state_loss(other, states, labels, 3) > 0.5

    def test_hidden_term_maps_the_teacher_through_the_kept_basis(self):
        teacher = _states(width=8)
        basis, _ = torch.linalg.qr(torch.randn(8, 3, generator=torch.Generator().manual_seed(2)))
        student = tuple(h @ basis for h in teacher)
        labels = torch.tensor([0, 1, 0])
        assert hidden_state_loss(student, teacher, labels, 3, stream_map=basis).abs() < 1e-6
        with pytest.raises(ValueError, match="no kept basis"):
            hidden_state_loss(student, teacher, labels, 3)
        # The final state is left out when the map does not hold there (a pre-norm decoder's final norm output).
        broken = student[:-1] + (torch.randn_like(student[-1]),)
        assert hidden_state_loss(broken, teacher, labels, 3, stream_map=basis, compare_final=False).abs() < 1e-6
        assert hidden_state_loss(broken, teacher, labels, 3, stream_map=basis) > 0.1

    def test_padding_is_not_compared(self):
        teacher, labels = _states(), torch.tensor([0, 1, 0])
        mask = torch.ones(3, 5, dtype=torch.long)
        mask[0, 3:] = 0
        student = tuple(h.clone() for h in teacher)
        for h in student:
            h[0, 3:] = 1e3
        assert hidden_state_loss(student, teacher, labels, 3, attention_mask=mask).abs() < 1e-7
        assert attention_loss(_attentions(), _attentions(), labels, 3, attention_mask=mask).abs() < 1e-7

    def test_a_position_the_teacher_leaves_at_zero_does_not_dominate(self):
        teacher, labels = _states(), torch.tensor([0, 1, 0])
        for h in teacher:
            h[0, 2] = 0.0  # a dead pixel: no channel fires there
        student = tuple(h + 0.01 * torch.randn_like(h) for h in teacher)
        # Live positions: error / energy ~ 1e-4 * 8 / 8; the dead one is divided by 1e-3 of its sample's median energy
        # (~8), not by 1e-6, which would weigh it 0.01**2 * 8 / 1e-6 = 800.
        assert hidden_state_loss(student, teacher, labels, 3) < 0.05
        # The floor only touches positions far below their sample's median: elsewhere the plain ratio.
        energy = teacher[1].pow(2).sum(-1)
        weights = torch.ones_like(energy)
        floored = energy_floor(energy, weights)
        assert torch.equal(floored[1:], energy[1:]) and torch.equal(floored[0, :2], energy[0, :2])
        assert torch.allclose(floored[0, 2], ENERGY_FLOOR * energy[0].median())
        # Positions that are not compared (padding) do not move the floor, nor does one massive position (a decoder's
        # first token), which would lift a mean above every other position.
        weights[0, 3:] = 0
        blown = energy.clone()
        blown[0, 3:] = 0.0
        blown[0, 0] = 1e9
        assert torch.allclose(energy_floor(blown, weights)[0, 2], ENERGY_FLOOR * blown[0, :3].median())
        assert torch.equal(energy_floor(blown, weights)[0, 1], blown[0, 1])

    def test_dead_pixels_of_a_real_resnet_keep_the_term_of_order_one(self):
        # A tiny ResNet's block outputs are zero at dozens of pixels (every channel under its ReLU); a 5% perturbation
        # of its weights gave a hidden term of 900 when those positions were divided by 1e-6, 0.86 with the floor.
        teacher = tiny_resnet()
        student = copy.deepcopy(teacher)
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.05 * torch.randn_like(p))
            images = random_images(16)
            t_states = teacher(pixel_values=images, output_hidden_states=True).hidden_states
            s_states = student(pixel_values=images, output_hidden_states=True).hidden_states
        assert any((h.pow(2).sum(1) == 0).any() for h in t_states)
        assert hidden_state_loss(s_states, t_states, torch.zeros(16, dtype=torch.long), 16) < 5.0

    def test_attention_term_is_kl_teacher_to_student(self):
        student, teacher = _attentions(seed=1), _attentions(seed=2)
        labels = torch.tensor([0, 1, 0])
        expected = sum((t * (t.log() - s.log())).sum(-1).mean(1).mean(-1).sum() for s, t in zip(student, teacher))
        assert torch.allclose(attention_loss(student, teacher, labels, 3), expected / 2 / 3, atol=1e-6)
        assert attention_loss(teacher, teacher, labels, 3).abs() < 1e-6
        # Different head counts: each side's head-averaged distribution.
        assert attention_loss(teacher, _attentions(heads=4, seed=2), labels, 3) >= 0

    @pytest.mark.parametrize("token_level", [False, True])
    def test_micro_batches_add_up_to_the_full_batch(self, token_level):
        student, teacher = _states(batch=4, seed=1), _states(batch=4, seed=2)
        s_att, t_att = _attentions(batch=4, seed=1), _attentions(batch=4, seed=2)
        if token_level:
            labels = torch.tensor([[1, 2, -100, 0, 1], [0, -100, -100, 1, 1], [1, 1, 1, 1, 1], [-100] * 4 + [2]])
        else:
            labels = torch.tensor([0, 1, 1, 0])
        items = count_items(labels, shift=False)
        for loss, s, t in ((hidden_state_loss, student, teacher), (attention_loss, s_att, t_att)):
            full = loss(s, t, labels, items)
            parts = sum(
                loss(tuple(x[i : i + 2] for x in s), tuple(x[i : i + 2] for x in t), labels[i : i + 2], items)
                for i in (0, 2)
            )
            assert torch.allclose(parts, full, atol=1e-6) and full > 0


class TestThroughRealModels:
    """The term is zero when the student is the teacher seen through the kept basis (exact slicings)."""

    def test_gpt2_full_rotation(self):
        torch.manual_seed(0)
        teacher = tf.GPT2LMHeadModel(tiny_config("gpt2")).eval()
        from hf_rmtkd.hidden import mean_aligned_basis

        eigenvectors, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(1)))
        basis = mean_aligned_basis(eigenvectors.double(), 32)
        student, _ = slice_gpt2(teacher, basis)
        ids = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            t, s = teacher(ids, output_hidden_states=True), student(ids, output_hidden_states=True)
        matrix = (basis - basis.mean(0, keepdim=True)).float()
        labels = ids
        term = hidden_state_loss(s.hidden_states, t.hidden_states, labels, 14, stream_map=matrix, compare_final=False)
        assert term < 1e-8
        # A different basis of the same width is not the student's: the test can fail.
        assert hidden_state_loss(s.hidden_states, t.hidden_states, labels, 14, stream_map=torch.eye(32)) > 1e-3

    def test_encoder_identity_and_composed_maps(self):
        basis = encoder_basis(torch.eye(32, dtype=torch.float64))
        assert torch.allclose(basis, torch.eye(32, dtype=torch.float64))

        class Holder:
            pass

        holder = Holder()
        first, _ = torch.linalg.qr(torch.randn(32, 16, generator=torch.Generator().manual_seed(0)))
        second, _ = torch.linalg.qr(torch.randn(16, 8, generator=torch.Generator().manual_seed(1)))
        add_stream_map(holder, StreamMap(first))
        add_stream_map(holder, StreamMap(second, compare_final=False))
        assert map_from(holder, 8) is None
        assert torch.allclose(map_from(holder, 32).matrix, first @ second, atol=1e-6)
        assert map_from(holder, 32).compare_final is False and map_from(holder, 16).matrix.shape == (16, 8)
        with pytest.raises(ValueError, match="no map between them"):
            map_from(holder, 24)
        # Part of the chain: the first step alone, and none at all for equal widths.
        assert torch.allclose(map_between(holder, 32, 16).matrix, first) and map_between(holder, 16, 16) is None
        assert torch.allclose(map_between(holder, 32, 8).matrix, first @ second, atol=1e-6)
        with pytest.raises(ValueError, match="lead from width 16 to 32"):
            map_between(holder, 16, 32)
        with pytest.raises(ValueError, match="cannot follow"):
            add_stream_map(holder, StreamMap(first))
