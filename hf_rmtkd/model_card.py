"""Model cards for RMTKD checkpoints: `model_card_template.md` filled through `huggingface_hub.ModelCard`."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .records import HIDDEN_SITE, ConvRecord, EmbeddingRecord, LinearRecord


logger = logging.getLogger(__name__)

UNKNOWN = "unknown"
TAGS = ["rmt-kd", "hf_rmtkd", "model-compression", "knowledge-distillation"]
PAPER = "arXiv 2509.15724"
# Hub task names of the RMTKD classes' Auto classes (pipeline tag and model-index task type).
TASKS = {
    "AutoModelForSequenceClassification": "text-classification",
    "AutoModelForTokenClassification": "token-classification",
    "AutoModelForCausalLM": "text-generation",
    "AutoModelForImageClassification": "image-classification",
    "AutoModel": "feature-extraction",
}


def template_path() -> Path:
    """The card template shipped inside the package (`hf_rmtkd/templates/model_card_template.md`)."""
    shipped = resources.files("hf_rmtkd") / "templates" / "model_card_template.md"
    if shipped.is_file():
        return Path(str(shipped))
    raise FileNotFoundError("model_card_template.md is missing from the hf_rmtkd installation.")


def _number(value, digits: int = 4) -> str:
    """A float to `digits` significant figures; `unknown` for missing or non-finite values."""
    if value is None or isinstance(value, bool):
        return UNKNOWN
    try:
        value = float(value)
    except (TypeError, ValueError):
        return UNKNOWN
    return f"{value:.{digits}g}" if math.isfinite(value) else UNKNOWN


def _count(value) -> str:
    return f"{int(value):,}" if isinstance(value, (int, float)) and math.isfinite(value) else UNKNOWN


def model_size_mb(model: torch.nn.Module) -> float:
    """Size of the parameters and buffers in MB (2**20 bytes), as the safetensors file holds them."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def base_model_size(model) -> tuple[int | None, float | None]:
    """Parameters and MB of the uncompressed architecture, built on the meta device (no memory, no weights)."""
    try:
        architecture, prefix = model._resolve_architecture(model.config)
        with torch.device("meta"):
            base = architecture(model.config.get_base_config())
        base = base.get_submodule(prefix) if prefix else base
        dtype_size = next(model.parameters()).element_size()
        params = sum(p.numel() for p in base.parameters())
        return params, params * dtype_size / 2**20
    except Exception as error:  # a card must still render; the figure is then shown as unknown
        logger.warning("Could not size the uncompressed model for the card: %s", error)
        return None, None


def reduced_module_rows(config) -> list[dict[str, str]]:
    """One table row per record: the hidden width first (`hidden_size`), then `config.reduced_modules` by path;
    module, kind, `d -> k`, the MP and budget ranks, `sigma2`, `lambda_plus` and how the module is stored."""
    records = sorted((config.reduced_modules or {}).items())
    if getattr(config, "hidden_width", None) is not None:
        records.insert(0, (HIDDEN_SITE, config.hidden_width))
    rows = []
    for name, record in records:
        dim = record.dim or getattr(record, "in_features", None)
        rows.append(
            {
                "name": name,
                "kind": record.kind,
                "dim": dim if dim is not None else UNKNOWN,
                "rank": record.rank,
                # Without an output-error budget the MP rule alone chose the rank.
                "ranks": f"{record.mp_rank} / {record.budget_rank}" if record.budget_rank is not None else "MP only",
                "sigma2": _number(record.sigma2),
                "lambda_plus": _number(record.lambda_plus),
                "form": _form(record),
            }
        )
    return rows


def _form(record) -> str:
    """How the reduced module is stored: sliced dense, factorised, or merged back to dense (with the timings)."""
    if isinstance(record, EmbeddingRecord):
        return "factorised table"
    if not isinstance(record, (LinearRecord, ConvRecord)):
        return "dense, narrower"
    timing = record.latency
    # Timed at `rows` rows (a linear layer without example inputs) or on the input a serving batch gave it.
    shape = timing.get("rows", timing.get("input_shape", UNKNOWN)) if isinstance(timing, Mapping) else None
    shape = f"input {tuple(shape)}" if isinstance(shape, list) else f"{shape} rows"
    measured = (
        f" ({_number(timing.get('factorised_ms'))} ms factorised vs {_number(timing.get('dense_ms'))} ms dense at "
        f"{shape}, {timing.get('device', UNKNOWN)})"
        if isinstance(timing, Mapping)
        else ""
    )
    noun = " convolution" if isinstance(record, ConvRecord) else ""
    return (f"dense{noun} (merged)" if record.merged else f"factorised{noun}") + measured


def _metric_rows(metrics: Mapping | None) -> list[dict[str, str]]:
    rows = []
    for name, values in (metrics or {}).items():
        before, after = values if isinstance(values, (tuple, list)) and len(values) == 2 else (None, values)
        rows.append({"name": name, "before": _number(before), "after": _number(after)})
    return rows


def _eval_results(model_name: str, task: str, datasets: list[str], metrics: Mapping | None) -> list[EvalResult]:
    """model-index entries: the compressed model's metric on the first named dataset."""
    if not datasets:
        return []
    results = []
    for name, values in (metrics or {}).items():
        after = values[1] if isinstance(values, (tuple, list)) and len(values) == 2 else values
        if _number(after) == UNKNOWN:
            continue
        results.append(
            EvalResult(
                task_type=task,
                dataset_type=datasets[0],
                dataset_name=datasets[0],
                metric_type=name.removeprefix("eval_"),
                metric_value=float(after),
            )
        )
    return results


def build_model_card(
    model,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    datasets: str | Iterable[str] | None = None,
    metrics: Mapping | None = None,
    latency_ratio: float | None = None,
    plots: Iterable[str | Path] = (),
    tags: Iterable[str] | None = None,
    model_name: str | None = None,
    license: str | None = None,
) -> ModelCard:
    """Render the card of an RMTKD model from its config and what the caller measured.

    Args:
        model ([`RMTKDPreTrainedModel`]): the compressed model; the reduced-module table comes from its config.
        repo_id (`str`, *optional*): where the card will live; used in the usage snippet.
        base_model (`str`, *optional*): Hub id or path of the uncompressed model; defaults to the base config's
            `_name_or_path`.
        datasets (`str` or `list[str]`, *optional*): data the model was calibrated and fine-tuned on.
        metrics (`dict[str, tuple[float, float] | float]`, *optional*): `name -> (before, after)` (or just the
            value after compression); a missing value shows as "unknown".
        latency_ratio (`float`, *optional*): measured latency of the compressed model over the uncompressed one.
        plots (`list[str]`, *optional*): spectrum PNGs, as paths relative to the card.
        tags (`list[str]`, *optional*): extra tags, added to `rmt-kd` and the library's.
        model_name (`str`, *optional*): title of the card; defaults to the repository name.
        license (`str`, *optional*): license identifier for the card metadata.

    Returns:
        `huggingface_hub.ModelCard`: the rendered card; `card.save(path)` writes it.
    """
    config = model.config
    datasets = [datasets] if isinstance(datasets, str) else list(datasets or [])
    base_model = base_model or (config.base_config or {}).get("_name_or_path") or None
    auto_class = getattr(type(model), "_task_auto_class", None)
    auto_name = getattr(auto_class, "__name__", "AutoModel")
    task = TASKS.get(auto_name, "feature-extraction")
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else None) or "RMT-KD compressed model"
    params_before, mb_before = base_model_size(model)
    params_after, mb_after = model.num_parameters(), model_size_mb(model)
    card_data = ModelCardData(
        library_name="transformers",
        tags=list(dict.fromkeys([*TAGS, *(tags or [])])),
        base_model=base_model if base_model and not Path(str(base_model)).is_absolute() else None,
        datasets=datasets or None,
        pipeline_tag=task,
        license=license,
        model_name=model_name,
        eval_results=_eval_results(model_name, task, datasets, metrics) or None,
    )
    calibration = config.calibration or {}
    ratio = params_after / params_before if params_before else None
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path()),
        model_name=model_name,
        base_model=base_model or UNKNOWN,
        base_model_url=f"https://huggingface.co/{base_model}" if base_model and "/" in str(base_model) else None,
        base_architecture=config.base_architecture or UNKNOWN,
        params_before=_count(params_before),
        params_after=_count(params_after),
        params_ratio=_number(ratio, 3),
        size_before_mb=_number(mb_before, 4),
        size_after_mb=_number(mb_after, 4),
        latency_ratio=_number(latency_ratio, 3),
        metrics=_metric_rows(metrics),
        datasets=", ".join(datasets) or UNKNOWN,
        reduced_modules=reduced_module_rows(config),
        calibration=", ".join(f"{k}={v}" for k, v in sorted(calibration.items()) if v is not None) or UNKNOWN,
        plots=[{"name": Path(p).stem.removeprefix("spectrum_"), "path": Path(p).as_posix()} for p in plots],
        auto_class=auto_name,
        repo_id=repo_id or "path/to/model",
        paper=PAPER,
    )


def spectrum_plots(folder: str | Path) -> list[str]:
    """The spectrum PNGs under `folder`, as sorted paths relative to it."""
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.glob("spectra/**/*.png"))


_NOT_METRICS = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_model_preparation_time")


def metrics_from_log_history(log_history: list[dict], first_reduction_step: int | None) -> dict[str, tuple]:
    """`name -> (before, after)` from a Trainer's `state.log_history`.

    Args:
        log_history (`list[dict]`): the Trainer's logs.
        first_reduction_step (`int`, *optional*): optimizer step of the first reduction; evaluations at or before it
            measure the uncompressed model. `None` when nothing was reduced.

    Returns:
        One entry per `eval_*` metric: the first evaluation before the first reduction (or `None`) and the last
        evaluation after it (or `None`).
    """
    evals = [entry for entry in log_history if any(k.startswith("eval_") for k in entry)]
    before = next(
        (e for e in evals if first_reduction_step is not None and e.get("step", 0) <= first_reduction_step), None
    )
    after = next(
        (e for e in reversed(evals) if first_reduction_step is None or e.get("step", 0) > first_reduction_step), None
    )
    names = [k for e in evals for k in e if k.startswith("eval_") and k not in _NOT_METRICS]
    return {name: ((before or {}).get(name), (after or {}).get(name)) for name in dict.fromkeys(names)}
