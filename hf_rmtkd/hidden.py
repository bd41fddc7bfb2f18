"""The hidden-width site: one projection of the whole residual stream (Llama-family decoders here; GPT-2 in
[`hf_rmtkd.hidden_gpt2`], post-LN encoders in [`hf_rmtkd.hidden_encoder`]).

The residual stream `x` (width `d`) is observed at the input of every decoder layer and of the final norm; the MP
rule on its pooled, uncentred covariance gives `k`, and the top-`k` eigenvectors `Q` (`d x k`, orthonormal columns)
define the new stream `z = Q^T x`. Everything that writes to the stream (token embeddings, attention output and MLP
down projections) is multiplied by `Q^T` on the left; everything that reads it through an RMSNorm (attention
Q/K/V, MLP gate/up, the head) absorbs the norm's weight and `Q` on the right. RMSNorm is rotation-invariant up to
its width: `z / rms_k(z)` equals `sqrt(d/k) Q^T x / rms_d(x)` when `rms_k` uses `eps * d / k`, so the new norms get
weight 1 and `eps * d / k`, and the readers a factor `sqrt(d/k)`. With `k = d` the model is the same function (a
rotation of its stream); with `k < d` the only change is the dropped directions (SliceGPT with one `Q` shared by
all layers). The head dimension is kept (`head_dim` set explicitly), the embeddings are untied from the head.

The result is a plain model of the same class with `hidden_size = k`: the record in `RMTKDConfig.reduced_modules`
(kind `"hidden"`) stores the config overrides, so `from_pretrained` rebuilds it from the base config (and, for
GPT-2, `attention_width`, the attention width restored on reload).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .analysis import SiteReport, SpectralOptions, analyze_statistics, round_rank
from .calibration import ActivationStatistics, collect_statistics
from .hidden_encoder import ENCODER_FAMILIES, EncoderLayout, align_mean_direction, encoder_basis, slice_encoder
from .hidden_gpt2 import GPT2_FAMILIES, gpt2_states, slice_gpt2
from .hidden_rebuild import float64_state, rebuild
from .kept_basis import StreamMap, add_stream_map
from .relaxation import relax_rank
from .sites import Site


HIDDEN_KEY = "<hidden_size>"
SUPPORTED = ("llama", "mistral", "qwen2")


def _family(model: nn.Module) -> str:
    """`"rmsnorm"` (Llama family), `"gpt2"` or `"encoder"` (post-LN); `TypeError` for anything else."""
    model_type = getattr(model.config, "model_type", None)
    if model_type in ENCODER_FAMILIES:
        return "encoder"
    if model_type in GPT2_FAMILIES:
        return "gpt2"
    if model_type not in SUPPORTED:
        raise TypeError(
            f"The hidden-width site supports pre-norm RMSNorm decoders {SUPPORTED}, GPT-2 {GPT2_FAMILIES} and post-LN "
            f"encoders {tuple(ENCODER_FAMILIES)}, got model_type {model_type!r} ({type(model).__name__})."
        )
    return "rmsnorm"


def _parts(model: nn.Module):
    if _family(model) != "rmsnorm":
        raise TypeError(f"{type(model).__name__} is not a Llama-family decoder: see `hf_rmtkd.hidden.reduce_hidden`.")
    prefix = model.base_model_prefix
    base = getattr(model, prefix, model)
    head = next(
        (getattr(model, n) for n in ("lm_head", "score") if isinstance(getattr(model, n, None), nn.Linear)), None
    )
    return prefix if base is not model else "", base, head


def stream_states(model: nn.Module) -> list[str]:
    """Modules whose input is a state of the residual stream: every decoder layer and the final norm, or in a post-LN
    encoder every layer, every FFN and the final reader (see [`hf_rmtkd.hidden_encoder.EncoderLayout`])."""
    family = _family(model)
    if family == "encoder":
        return EncoderLayout(model).states
    if family == "gpt2":
        return gpt2_states(model)
    prefix, base, _ = _parts(model)
    dot = f"{prefix}." if prefix else ""
    return [f"{dot}layers.{i}" for i in range(len(base.layers))] + [f"{dot}norm"]


def residual_statistics(
    model: nn.Module,
    calibration_data,
    max_samples: int | None = None,
    progress: bool = True,
    return_fingerprint: bool = False,
):
    """Statistics of the residual stream, pooled (averaged) over its states and per state.

    Returns:
        The pooled statistics, of width `d`, whose `count` is the number of tokens (not tokens x states: every state
        sees the same tokens, so the MP ratio `q = d / n` uses the token count), and the statistics per state
        (keyed by [`stream_states`]); with `return_fingerprint`, also the sha256 of the calibration batches.
    """
    names = stream_states(model)
    stats, fingerprint = collect_statistics(model, calibration_data, names, max_samples, progress)
    states = [stats[name] for name in names]
    mean_outer = sum(s.sum_outer for s in states) / len(states)
    pooled = ActivationStatistics(mean_outer, sum(s.sum for s in states) / len(states), states[0].count)
    return (pooled, stats, fingerprint) if return_fingerprint else (pooled, stats)


def analyze_hidden(stats: ActivationStatistics, heads: int, options: SpectralOptions) -> SiteReport:
    """MP analysis of the pooled residual stream (uncentred: the projection must be linear, without a mean offset).

    The rank is rounded up to a multiple of the number of attention `heads` (transformers requires `hidden_size` to be
    one, even with an explicit `head_dim`) and of `options.rank_multiple`; `signal_rank` keeps the MP count.
    """
    hidden_options = dataclasses.replace(options, centered=False, rank_multiple=math.lcm(options.rank_multiple, heads))
    return analyze_statistics(Site(HIDDEN_KEY, "hidden", stats.dim), stats, hidden_options)


def step_width(current: int, mp_width: int, steps_left: int, relaxation: float = 0.0) -> int:
    """The width of one hidden-width step, before rounding.

    Progressive width reaches the MP width in `steps_left` geometric steps: `current * (mp / current)^(1 / steps)`
    (the MP width itself when `steps_left` is 1). `relaxation` in [0, 1) moves it towards `current` by that share of
    the gap (the gentler rank a metric budget retries with).
    """
    if steps_left < 1:
        raise ValueError(f"`steps_left` must be >= 1, got {steps_left}.")
    target = mp_width if steps_left == 1 else current * (mp_width / current) ** (1.0 / steps_left)
    return relax_rank(max(mp_width, round(target)), current, relaxation)


def reduce_hidden(
    wrapper,
    calibration_data,
    options: SpectralOptions,
    progress: bool = True,
    steps_left: int = 1,
    relaxation: float = 0.0,
    width: int | None = None,
) -> SiteReport:
    """Analyse, slice and record the hidden width of an RMTKD model (`wrapper.model` is replaced).

    Decoders are sliced exactly up to the dropped directions; post-LN encoders are approximated (their norms fitted
    on a second pass over `calibration_data`, which must then be re-iterable, see [`hf_rmtkd.hidden_encoder`]) and
    need distillation to recover. The map from the old stream to the new one is kept on `wrapper` (see
    [`hf_rmtkd.kept_basis`]) for representation distillation.

    Args:
        steps_left (`int`, *optional*, defaults to 1): progressive width: hidden-width steps left including this
            one; the width is a geometric step towards the MP width (see [`step_width`]).
        relaxation (`float`, *optional*, defaults to 0): share of the gap to the current width added back.
        width (`int`, *optional*): a fixed new width instead of the MP rule's (the top principal directions: PCA
            slicing, e.g. for a baseline); rounded up to a multiple of the heads.

    Returns:
        The [`SiteReport`]; its `rank` is the new width (`dim` when nothing was dropped, then the model is unchanged).

    Raises:
        `ValueError` if sites other than the hidden width were reduced first: their recorded shapes depend on it.
    """
    others = [name for name in wrapper.config.reduced_modules if name != HIDDEN_KEY]
    if others:
        raise ValueError(
            "The hidden width must be reduced before any other site (their recorded shapes depend on it); this "
            f"model already has {len(others)} reduced modules."
        )
    model = wrapper.model
    pooled, states, fingerprint = residual_statistics(model, calibration_data, options.max_samples, progress, True)
    family, heads = _family(model), model.config.num_attention_heads
    report = (analyze_gpt2 if family == "gpt2" else analyze_hidden)(pooled, heads, options)
    multiple = math.lcm(options.rank_multiple, heads)
    previous = wrapper.config.reduced_modules.get(HIDDEN_KEY)
    # Progressive width re-estimates the MP width at every step, but never goes below the first estimate: the
    # narrower model's own spectrum would otherwise pull the target down step after step.
    mp_width = max(report.rank, previous.get("first_mp_width", 0)) if previous else report.rank
    if width is None:
        width = step_width(report.dim, mp_width, steps_left, relaxation)
    width = round_rank(width, report.dim, multiple)
    report = dataclasses.replace(report, rank=width)
    if width >= report.dim:
        return report
    top = report.eigenvectors[:, :width]
    record = {}
    if family == "encoder":
        wrapper.model, overrides = slice_encoder(model, top, states, calibration_data, options.max_samples, progress)
        stream_map = StreamMap(encoder_basis(top), compare_final=True)
    elif family == "gpt2":
        # `width` - 1 MP directions and the all-ones direction (see `analyze_gpt2`).
        basis = mean_aligned_basis(report.eigenvectors, width)
        wrapper.model, overrides = slice_gpt2(model, basis)
        record["attention_width"] = report.dim
        # The student's stream is the centred teacher stream, projected.
        stream_map = StreamMap(basis - basis.mean(dim=0, keepdim=True), compare_final=False)
    else:
        wrapper.model, overrides = slice_hidden(model, top)
        stream_map = StreamMap(top, compare_final=False)
    add_stream_map(wrapper, stream_map)
    new = {**hidden_record(report, overrides), **record, "first_mp_width": mp_width}
    if previous is not None:
        # A later progressive step: the record stays relative to the original model.
        new.update(
            dim=previous["dim"],
            in_features=previous["in_features"],
            out_features=previous["out_features"],
            config_overrides={**previous["config_overrides"], **overrides},
            widths=previous.get("widths", [previous["rank"]]) + [width],
        )
        for key in ("attention_width", "first_mp_width"):
            if key in previous:
                new[key] = previous[key]
    wrapper.config.reduced_modules[HIDDEN_KEY] = new
    # Provenance and the spectrum (for the card's plots) as for every other site; a later reduction of other sites
    # records its own calibration.
    wrapper.config.record_calibration(fingerprint, report.n_samples, dataclasses.asdict(options))
    spectrum = dataclasses.replace(report, eigenvectors=torch.empty(0), statistics=None)
    wrapper.__dict__.setdefault("rmtkd_spectra", {})[HIDDEN_KEY] = spectrum
    return report


def centred_statistics(stats: ActivationStatistics) -> ActivationStatistics:
    """Statistics of `C x`, `C = I - 1 1^T / d`: the stream once GPT-2's writers are centred (`hf_rmtkd.hidden_gpt2`)."""
    centring = torch.eye(stats.dim, dtype=stats.sum_outer.dtype) - 1.0 / stats.dim
    return ActivationStatistics(centring @ stats.sum_outer @ centring, centring @ stats.sum, stats.count)


def analyze_gpt2(stats: ActivationStatistics, heads: int, options: SpectralOptions) -> SiteReport:
    """MP analysis of GPT-2's centred stream. `rank` is the new width: the MP count plus one for the mean direction,
    rounded up to a multiple of `heads` and `options.rank_multiple` (GPT-2 requires `n_embd % n_head == 0`)."""
    site = Site(HIDDEN_KEY, "hidden", stats.dim)
    report = analyze_statistics(
        site, centred_statistics(stats), dataclasses.replace(options, centered=False, rank_multiple=1)
    )
    width = round_rank(report.rank + 1, report.dim, math.lcm(options.rank_multiple, heads))
    total = float(report.eigenvalues.sum())
    retained = float(report.eigenvalues[: width - 1].sum()) / total if total > 0 else 1.0
    return dataclasses.replace(report, rank=width, retained_variance=retained)


def mean_aligned_basis(eigenvectors: torch.Tensor, width: int) -> torch.Tensor:
    """The basis GPT-2 is sliced with, shape `(d, width)`: the `width - 1` leading `eigenvectors` (shape `(d, d)`,
    columns) made orthogonal to `1_d`, plus `1_d / sqrt(d)`, reflected so that `1_d` maps onto the direction of
    `1_width` (see [`hf_rmtkd.hidden_gpt2`])."""
    d = eigenvectors.shape[0]
    ones = torch.full((d, 1), 1.0 / math.sqrt(d), dtype=eigenvectors.dtype)
    top = eigenvectors[:, : width - 1]
    top, _ = torch.linalg.qr(top - ones @ (ones.T @ top))
    return align_mean_direction(torch.cat([top, ones], dim=1))


@torch.no_grad()
def slice_hidden(model: nn.Module, basis: torch.Tensor) -> tuple[nn.Module, dict]:
    """A new model of the same class whose residual stream is `basis^T x`.

    Args:
        model: a Llama-family model (`...ForCausalLM`, `...ForSequenceClassification` or the base model).
        basis (`torch.Tensor` of shape `(d, k)`): orthonormal columns spanning the kept directions.

    Returns:
        The new model (same device and dtype, eval/train mode kept) and the config overrides that rebuild it.
    """
    prefix, base, head = _parts(model)
    config = model.config
    d, k = basis.shape
    scale = math.sqrt(d / k)
    q = basis.to(torch.float64).cpu()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    overrides = {
        "hidden_size": k,
        "head_dim": head_dim,
        "rms_norm_eps": config.rms_norm_eps * d / k,
        "tie_word_embeddings": False,
    }
    state = float64_state(model)
    dot = f"{prefix}." if prefix else ""

    def writer(name):  # rows of a module that writes into the stream: W (d, *) -> Q^T W (k, *)
        state[name] = q.T @ state[name]

    def reader(name, norm):  # W (*, d) reading RMSNorm(x) with weight g -> W diag(g) Q * sqrt(d / k)
        state[name] = (state[name] * state[norm][None, :]) @ q * scale

    state[f"{dot}embed_tokens.weight"] = state[f"{dot}embed_tokens.weight"] @ q
    for i in range(len(base.layers)):
        layer = f"{dot}layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj"):
            reader(f"{layer}self_attn.{proj}.weight", f"{layer}input_layernorm.weight")
        for proj in ("gate_proj", "up_proj"):
            reader(f"{layer}mlp.{proj}.weight", f"{layer}post_attention_layernorm.weight")
        for name in (f"{layer}self_attn.o_proj", f"{layer}mlp.down_proj"):
            writer(f"{name}.weight")
            if f"{name}.bias" in state:
                state[f"{name}.bias"] = q.T @ state[f"{name}.bias"]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"{layer}{norm}.weight"] = torch.ones(k, dtype=torch.float64)
    if head is not None:
        head_name = next(n for n, m in model.named_modules() if m is head)
        reader(f"{head_name}.weight", f"{dot}norm.weight")
    state[f"{dot}norm.weight"] = torch.ones(k, dtype=torch.float64)
    return rebuild(model, overrides, state), overrides


def hidden_record(report: SiteReport, overrides: dict) -> dict:
    """The `RMTKDConfig.reduced_modules` entry of a hidden-width reduction."""
    return {
        "kind": "hidden",
        "in_features": report.dim,
        "out_features": report.dim,
        "dim": report.dim,
        "rank": report.rank,
        "signal_rank": report.signal_rank,
        "config_overrides": overrides,
        "n_samples": report.n_samples,
        "sigma2": report.sigma2,
        "lambda_plus": report.lambda_plus,
        "threshold": report.threshold,
        "retained_variance": report.retained_variance,
    }
