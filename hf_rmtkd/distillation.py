"""The RMT-KD self-distillation loss `alpha * CE + (1 - alpha) * T^2 * KL(p_old || p_new)`, as a pure function."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


IGNORE_INDEX = -100


@dataclass
class DistillationLoss:
    """Loss and its two terms, each already normalised by the item count.

    Attributes:
        loss (`torch.Tensor`, scalar): `alpha * ce + (1 - alpha) * kl`, the value to back-propagate.
        ce (`torch.Tensor`, scalar): cross-entropy with the labels.
        kl (`torch.Tensor`, scalar): `T^2 * KL(teacher || student)` at temperature `T` (zero without a teacher).
    """

    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    alpha: float = 0.7,
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    shift_labels: bool = False,
) -> DistillationLoss:
    """Cross-entropy plus distillation from a teacher, summed per item and divided once by the item count.

    Items are examples for sequence and image classification, and tokens for token classification and causal LMs
    (labels equal to -100, e.g. padding, are masked out of both terms). Dividing the *sums* by
    `num_items_in_batch` (the count over all gradient-accumulation micro-batches, as `Trainer` passes it) makes
    accumulated gradients equal those of the full batch.

    Args:
        student_logits (`torch.Tensor` of shape `(batch_size, num_classes)` or `(batch_size, seq_len, num_classes)`).
        labels (`torch.Tensor` of shape `(batch_size,)` or `(batch_size, seq_len)`): class ids, -100 to ignore.
        teacher_logits (`torch.Tensor`, *optional*): same shape as `student_logits`; `None` means no KL term.
        alpha (`float`, *optional*, defaults to 0.7): weight of the cross-entropy, in [0, 1].
        temperature (`float`, *optional*, defaults to 1.0): softmax temperature `T` of both distributions; the KL
            term is scaled by `T^2` (Hinton et al.) so its gradients keep their size as `T` changes.
        num_items_in_batch (`int`, *optional*): divisor of the summed terms; defaults to the items in this batch.
        shift_labels (`bool`, *optional*, defaults to `False`): causal LM: position `t` predicts label `t + 1`.

    Returns:
        [`DistillationLoss`].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha}.")
    if temperature <= 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}.")
    if shift_labels:
        student_logits = student_logits[..., :-1, :]
        labels = labels[..., 1:]
        teacher_logits = teacher_logits[..., :-1, :] if teacher_logits is not None else None
    num_classes = student_logits.shape[-1]
    student = student_logits.reshape(-1, num_classes).float()
    flat_labels = labels.reshape(-1).to(student.device)
    keep = flat_labels != IGNORE_INDEX
    items = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp_min(1)
    if isinstance(items, torch.Tensor):
        items = items.to(student.device)
    ce = F.cross_entropy(student, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum") / items
    if teacher_logits is None:
        kl = torch.zeros((), device=student.device)
    else:
        teacher = teacher_logits.reshape(-1, num_classes).float().to(student.device)
        log_student = F.log_softmax(student[keep] / temperature, dim=-1)
        log_teacher = F.log_softmax(teacher[keep] / temperature, dim=-1)
        # KL(p_teacher || p_student) summed over classes and items.
        kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="sum") * temperature**2 / items
    return DistillationLoss(loss=alpha * ce + (1.0 - alpha) * kl, ce=ce, kl=kl)


EMBEDDING_DISTANCES = ("cosine", "mse", "l2")


def embedding_distance(student: torch.Tensor, target: torch.Tensor, distance: str = "cosine") -> torch.Tensor:
    """Per-sentence distance between student and target sentence embeddings, shape `(batch,)`.

    `"cosine"`: `1 - cos(s, t)` (scale-free; sentence-transformers' default for embedding distillation), `"mse"`: the
    mean squared difference over dimensions (its `MSELoss` recipe), `"l2"`: the Euclidean distance. Summed over a
    batch and divided by the sentences of the whole accumulated batch, gradient accumulation equals the full batch.

    Args:
        student (`torch.Tensor` of shape `(batch, dim)`): the student's embeddings (with gradients).
        target (`torch.Tensor` of shape `(batch, dim)`): the teacher's, already in the student's space.
        distance (`str`): one of `EMBEDDING_DISTANCES`.
    """
    if distance not in EMBEDDING_DISTANCES:
        raise ValueError(f"`distance` must be one of {EMBEDDING_DISTANCES}, got {distance!r}.")
    if student.shape != target.shape:
        raise ValueError(
            f"Student embeddings {tuple(student.shape)} and targets {tuple(target.shape)} differ in shape."
        )
    student, target = student.float(), target.float().to(student.device)
    if distance == "cosine":
        return 1.0 - F.cosine_similarity(student, target, dim=-1)
    if distance == "mse":
        return (student - target).pow(2).mean(dim=-1)
    return (student - target).norm(dim=-1)
