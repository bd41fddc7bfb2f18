"""Representation distillation: hidden states through the kept basis, and attention distributions, as pure functions.

Both terms are summed per *item* (the unit the cross-entropy counts: an example for sequence and image
classification, a labelled token for token classification and causal LMs) and divided once by `num_items_in_batch`,
so accumulated gradients equal those of the full batch, as for [`hf_rmtkd.distillation.distillation_loss`].

* Hidden states: per position, `||z_s - h_t M||^2 / ||h_t M||^2` (a normalised squared error, so every layer and
  token weighs the same whatever its scale; the divisor is at least `ENERGY_FLOOR` times the sample's median), averaged
  over the compared layers; `M` is the kept basis of a hidden-width reduction ([`hf_rmtkd.kept_basis`]) or the
  identity where the width did not change.
* Attention: per query position, `KL(a_t || a_s)` of the attention distributions, averaged over heads and layers.
  Where the head counts differ the distributions are averaged over heads first (each side's mean attention), which
  is still a distribution; where the depths differ, student layer `j` of `L_s` is matched with teacher layer
  `round((j + 1) L_t / L_s) - 1` (uniform map; identity when the depth is kept).
"""

from __future__ import annotations

import torch

from .distillation import IGNORE_INDEX
from .kept_basis import map_from


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer index for every student layer: the identity when the depths match, else uniform (last to last)."""
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(f"Layer counts must be >= 1, got {student_layers} and {teacher_layers}.")
    return [max(0, round((j + 1) * teacher_layers / student_layers) - 1) for j in range(student_layers)]


def item_weights(
    labels: torch.Tensor, positions: int, attention_mask: torch.Tensor | None, shift: bool
) -> torch.Tensor:
    """How much each position counts, shape `(batch, positions)`, such that the sum over a batch is its item count.

    Sequence-level labels (shape `(batch,)`): each example's valid positions (`attention_mask`) share weight 1.
    Token-level labels (shape `(batch, positions)`): weight 1 at each labelled position (`shift`: causal LM, position
    `t` is labelled by `labels[t + 1]`).
    """
    batch = labels.shape[0]
    if labels.dim() == 1:
        mask = torch.ones(batch, positions) if attention_mask is None else attention_mask.float().cpu()
        mask = mask.to(labels.device)
        return mask / mask.sum(1, keepdim=True).clamp_min(1)
    valid = (labels != IGNORE_INDEX).float()
    if shift:
        valid = torch.cat([valid[:, 1:], torch.zeros_like(valid[:, :1])], dim=1)
    return valid


def count_items(labels: torch.Tensor, shift: bool) -> torch.Tensor:
    """The items of one batch: examples for sequence-level labels, labelled tokens (shifted for causal LMs) else."""
    if labels.dim() == 1:
        return torch.tensor(float(labels.shape[0]))
    return item_weights(labels, labels.shape[1], None, shift).sum().clamp_min(1)


def _layer_weights(state: torch.Tensor, labels, attention_mask, shift) -> torch.Tensor:
    positions = state.shape[2] * state.shape[3] if state.dim() == 4 else state.shape[-2]
    mask = attention_mask if attention_mask is not None and attention_mask.shape[-1] == positions else None
    return item_weights(labels, positions, mask, shift)


def _positions(state: torch.Tensor) -> torch.Tensor:
    """`(batch, positions, width)`: token states as they are, image feature maps `(B, C, H, W)` as `(B, H*W, C)`."""
    if state.dim() == 4:
        return state.flatten(2).transpose(1, 2)
    return state


# A position's error is divided by at least this share of its sample's median target energy: a position the teacher
# leaves (near) zero, such as a pixel no channel of a ReLU block output fires at, would otherwise weigh up to 1e6 times
# a typical one. The median, not the mean: a decoder's first token carries massive activations (SmolLM2-135M on
# 128-token WikiText-2 windows: from layer 12 on the mean lies up to 430x above the other tokens' energies). The
# smallest energy / median measured is far above the floor on real models (ResNet-56 block outputs 0.013 over 256
# CIFAR-10 test images, all-MiniLM-L6-v2 layers 0.079 over 256 SST-2 sentences, SmolLM2-135M 0.41); with random crops
# 5 of the 6.7 million block-output positions of 512 training images fall below it (the smallest at 4e-4).
ENERGY_FLOOR = 1e-3


def energy_floor(energy: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The divisor of each position's squared error: its target energy, at least `ENERGY_FLOOR` times the median target
    energy over its sample's compared positions (and at least 1e-6).

    Args:
        energy (`torch.Tensor` of shape `(batch, positions)`): squared norm of each target state.
        weights (`torch.Tensor` of shape `(batch, positions)`): the positions' weights (0 where not compared).

    Returns:
        `torch.Tensor` of shape `(batch, positions)`. Per sample, so accumulated micro-batches match the full batch.
    """
    typical = energy.masked_fill(weights <= 0, float("nan")).nanmedian(-1, keepdim=True).values.nan_to_num(0.0)
    return torch.maximum(energy, ENERGY_FLOOR * typical).clamp_min(1e-6)


def hidden_state_loss(
    student_states: tuple[torch.Tensor, ...],
    teacher_states: tuple[torch.Tensor, ...],
    labels: torch.Tensor,
    num_items: int | torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    shift: bool = False,
    stream_map: torch.Tensor | None = None,
    compare_final: bool = True,
) -> torch.Tensor:
    """Normalised squared error between student states and the teacher's mapped into the student's stream.

    Args:
        student_states: `hidden_states` of the student, each `(batch, positions, k)` (or `(B, C, H, W)`).
        teacher_states: `hidden_states` of the teacher, each `(batch, positions, d)`; entry 0 (the embedding output)
            is matched to entry 0, the others through [`layer_map`].
        labels (`torch.Tensor`): the batch's labels, shape `(batch,)` or `(batch, positions)` (what an item is).
        num_items: the divisor (items over all accumulated micro-batches, see [`count_items`]).
        attention_mask (`torch.Tensor` of shape `(batch, positions)`, *optional*): padding is not compared.
        shift (`bool`): causal LM labels (position `t` is labelled by `labels[t + 1]`).
        stream_map (`torch.Tensor` of shape `(d, k)`, *optional*): the kept basis; `None` where `d == k`.
        compare_final (`bool`): whether the last state is compared too (`False` when it is a final norm's output
            that `stream_map` does not map).

    Returns:
        Scalar tensor, 0 when every student state equals the mapped teacher state.
    """
    depth = layer_map(len(student_states) - 1, len(teacher_states) - 1)
    pairs = [(0, 0)] + [(j + 1, t + 1) for j, t in enumerate(depth)]
    if not compare_final:
        pairs = pairs[:-1]
    if not pairs:
        return student_states[0].new_zeros(())
    total = 0.0
    for s, t in pairs:
        student = _positions(student_states[s]).float()
        target = _positions(teacher_states[t]).float().to(student.device)
        if stream_map is not None:
            target = target @ stream_map.to(student.device, student.dtype)
        if target.shape != student.shape:
            raise ValueError(
                f"Hidden state {s} of the student has shape {tuple(student.shape)}, the teacher's (mapped) "
                f"{tuple(target.shape)}: the widths differ and no kept basis maps one onto the other."
            )
        weights = _layer_weights(student_states[s], labels, attention_mask, shift).to(student.device)
        energy = target.pow(2).sum(-1)
        error = (student - target).pow(2).sum(-1) / energy_floor(energy, weights)
        total = total + (error * weights).sum()
    return total / len(pairs) / num_items


def attention_loss(
    student_attentions: tuple[torch.Tensor, ...],
    teacher_attentions: tuple[torch.Tensor, ...],
    labels: torch.Tensor,
    num_items: int | torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    shift: bool = False,
) -> torch.Tensor:
    """`KL(teacher || student)` of attention distributions, per query position, averaged over heads and layers.

    Args:
        student_attentions / teacher_attentions: per layer, `(batch, heads, queries, keys)` probabilities.
        labels, num_items, attention_mask, shift: as for [`hidden_state_loss`] (queries are the positions).

    Returns:
        Scalar tensor, 0 when the distributions are equal.
    """
    if not student_attentions:
        return torch.zeros(())
    total = 0.0
    mapping = layer_map(len(student_attentions), len(teacher_attentions))
    for student, t in zip(student_attentions, mapping):
        teacher = teacher_attentions[t].float().to(student.device)
        student = student.float()
        if teacher.shape[1] != student.shape[1]:
            teacher, student = teacher.mean(1, keepdim=True), student.mean(1, keepdim=True)
        kl = (torch.special.xlogy(teacher, teacher) - teacher * student.clamp_min(1e-12).log()).sum(-1)
        weights = item_weights(labels, kl.shape[-1], attention_mask, shift).to(kl.device)
        total = total + (kl.mean(1) * weights).sum()
    return total / len(student_attentions) / num_items


def output_flags(args, student, teacher) -> dict:
    """Forward keywords the weighted terms need (`output_hidden_states`, `output_attentions`); empty without a
    teacher. The attention term switches `student` and `teacher` to eager attention, the only kind that returns the
    probabilities (sdpa and flash do not)."""
    if teacher is None:
        return {}
    flags = {}
    if args.term_weight("hidden") > 0:
        flags["output_hidden_states"] = True
    if args.term_weight("attention") > 0:
        flags["output_attentions"] = True
        # Once per model object (a reduction that rebuilds the model gives a new one), not on every step.
        for model in (student, teacher):
            if not model.__dict__.get("_rmtkd_eager_attention"):
                if getattr(model.config, "_attn_implementation", "eager") != "eager":
                    model.set_attn_implementation("eager")
                if model is student:
                    disable_attention_dropout(student)
                model.__dict__["_rmtkd_eager_attention"] = True
    return flags


def disable_attention_dropout(model) -> None:
    """Set the dropout on attention probabilities to 0 in every attention module of `model`.

    Eager attention returns the probabilities *after* dropout: in training a tenth of them are 0 and the rest
    scaled up, which is no distribution, and the KL to the teacher's would be dominated by the dropped entries.
    """
    for module in model.modules():
        if "attention" not in type(module).__name__.lower():
            continue
        for name, child in module.named_children():
            if isinstance(child, torch.nn.Dropout) and "resid" not in name:
                child.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def representation_terms(flags, student, outputs, teacher_outputs, labels, num_items, attention_mask, shift) -> dict:
    """`{"hidden": ..., "attention": ...}` for the terms in `flags` (see [`output_flags`]).

    `student` is the RMTKD model: its kept bases map the teacher's stream where the widths differ.
    """
    if num_items is None:
        num_items = count_items(labels, shift)
    terms = {}
    name = type(getattr(student, "model", student)).__name__
    if flags.get("output_hidden_states"):
        states, teacher_states = outputs.hidden_states, teacher_outputs.hidden_states
        if not states or not teacher_states:
            raise ValueError(f"{name} returns no `hidden_states`: set distillation_hidden_weight=0.")
        stream_map = None
        if states[0].dim() == 3 and teacher_states[0].shape[-1] != states[0].shape[-1]:
            stream_map = map_from(student, teacher_states[0].shape[-1])
        terms["hidden"] = hidden_state_loss(
            states,
            teacher_states,
            labels,
            num_items,
            attention_mask,
            shift,
            stream_map=None if stream_map is None else stream_map.matrix,
            compare_final=True if stream_map is None else stream_map.compare_final,
        )
    if flags.get("output_attentions"):
        if not outputs.attentions or not teacher_outputs.attentions:
            raise ValueError(f"{name} returns no attention probabilities: set distillation_attention_weight=0.")
        terms["attention"] = attention_loss(
            outputs.attentions, teacher_outputs.attentions, labels, num_items, attention_mask, shift
        )
    return terms
