"""The distillation loss in isolation: known limits, masking, temperature scaling and item normalisation."""

import pytest
import torch
import torch.nn.functional as F

from hf_rmtkd.distillation import distillation_loss


def test_identical_logits_give_zero_kl():
    logits = torch.randn(6, 4)
    terms = distillation_loss(logits, torch.randint(0, 4, (6,)), logits.clone(), alpha=0.3)
    assert terms.kl.abs() < 1e-6
    assert torch.allclose(terms.loss, 0.3 * terms.ce)


def test_alpha_one_is_plain_cross_entropy():
    logits, labels = torch.randn(5, 3), torch.randint(0, 3, (5,))
    terms = distillation_loss(logits, labels, torch.randn(5, 3), alpha=1.0)
    assert torch.allclose(terms.loss, F.cross_entropy(logits, labels))


def test_alpha_zero_is_kl_teacher_to_student():
    student, teacher = torch.randn(4, 5), torch.randn(4, 5)
    terms = distillation_loss(student, torch.zeros(4, dtype=torch.long), teacher, alpha=0.0)
    p = teacher.softmax(-1)
    expected = (p * (p.log() - student.log_softmax(-1))).sum(-1).mean()
    assert torch.allclose(terms.loss, expected, atol=1e-6)


def test_temperature_squared_scaling():
    student, teacher = torch.randn(8, 5), torch.randn(8, 5)
    labels = torch.zeros(8, dtype=torch.long)
    at_t = distillation_loss(student, labels, teacher, alpha=0.0, temperature=2.0).kl
    unscaled = distillation_loss(student / 2.0, labels, teacher / 2.0, alpha=0.0, temperature=1.0).kl
    assert torch.allclose(at_t, 4.0 * unscaled, atol=1e-6)


def test_ignored_positions_count_in_neither_term():
    student, teacher = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    labels = torch.tensor([[1, 2, -100, -100], [3, -100, -100, -100]])
    terms = distillation_loss(student, labels, teacher, alpha=0.5)
    garbage = student.clone()
    garbage[labels == -100] = 1e4  # values at ignored positions must not matter
    again = distillation_loss(garbage, labels, teacher, alpha=0.5)
    assert torch.allclose(terms.loss, again.loss)


def test_causal_shift_predicts_the_next_label():
    logits = torch.randn(1, 5, 7)
    labels = torch.tensor([[0, 1, 2, 3, 4]])
    terms = distillation_loss(logits, labels, None, alpha=1.0, shift_labels=True)
    assert torch.allclose(terms.ce, F.cross_entropy(logits[0, :-1], labels[0, 1:]))


def test_sums_are_divided_once_by_num_items():
    # Two micro-batches normalised by the global item count add up to the full-batch loss.
    student, teacher = torch.randn(2, 6, 5), torch.randn(2, 6, 5)
    labels = torch.tensor([[1, 2, 3, -100, -100, -100], [0, 1, 2, 3, 4, -100]])
    full = distillation_loss(student, labels, teacher, alpha=0.7).loss
    items = int((labels != -100).sum())
    parts = sum(
        distillation_loss(student[i : i + 1], labels[i : i + 1], teacher[i : i + 1], 0.7, 1.0, items).loss
        for i in range(2)
    )
    assert torch.allclose(parts, full, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [({"alpha": 1.5}, "`alpha`"), ({"temperature": 0.0}, "`temperature`")])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        distillation_loss(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), **kwargs)
