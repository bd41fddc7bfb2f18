"""What a reduction leaves in `RMTKDConfig`: one typed record per reduced site, with to/from dict and validation here.

Five kinds:

* [`FFNRecord`] (`kind="ffn"`): the inner width of a feed-forward (or conv) block: the consumer at `path` and its
  `producers` were narrowed to `rank` channels.
* [`LinearRecord`] (`kind="linear"`): one linear layer factorised to rank `rank` (`merged` once multiplied back to
  dense for speed by [`hf_rmtkd.latency`]).
* [`EmbeddingRecord`] (`kind="embedding"`): the input token table factorised as `up(down(ids))` of rank `rank`
  (`in_features` is the vocabulary size, `out_features` the embedding width).
* [`ConvRecord`] (`kind="conv"`): one convolution factorised as a `k x k` convolution to `rank` channels and a
  `1 x 1` convolution back (`in_features`/`out_features` are its channels; `merged` as for a linear layer).
* [`HiddenRecord`] (`kind="hidden"`): the width of the whole residual stream; it is not a module, so it has its own
  field of the config (`RMTKDConfig.hidden_width`), and it carries the base-config values that rebuild it.

Every record also holds the provenance of its rank (the MP analysis: `dim`, `n_samples`, `sigma2`, `lambda_plus`,
`threshold`, ...). Format versions: 1 (hf_rmtkd 0.1.0: plain dicts, the hidden width stored in `reduced_modules`
under `"<hidden_size>"`), 2 (this module). [`upgrade_records`] converts version 1 on read.

This file is copied beside every checkpoint for `trust_remote_code` (see `modeling_rmtkd`): standard library only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar


FORMAT_VERSION = 2
# Where format 1 kept the hidden-width record inside `reduced_modules`.
LEGACY_HIDDEN_KEY = "<hidden_size>"
# The hidden width's name in reports, logs, plots and the schedule (never a module path).
HIDDEN_SITE = "hidden_size"


# The MP analysis behind a rank, as `SiteReport` and every record name it.
PROVENANCE_KEYS = ("dim", "signal_rank", "n_samples", "sigma2", "lambda_plus", "threshold", "retained_variance",
                   "mp_rank", "budget_rank", "output_error")  # fmt: skip
OPTION_KEYS = ("estimator", "tau", "false_alarm")


def provenance_of(site: Any, options: Any = None) -> dict:
    """The provenance fields of a record, read from an analysed site (a `SiteReport`) and, if given, the spectral
    options that chose its rank."""
    values = {key: getattr(site, key, None) for key in PROVENANCE_KEYS}
    if options is not None:
        values.update({key: getattr(options, key) for key in OPTION_KEYS})
    return values


def _positive_int(where: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{where}.{name}` must be a positive int, got {value!r}.")


@dataclass(kw_only=True)
class ReductionRecord:
    """Fields every kind shares: the kept `rank` and the MP analysis behind it (all provenance is optional: records
    written by hand or by older versions may lack it).

    Args:
        rank (`int`): kept width (FFN, hidden) or factorisation rank (linear).
        dim (`int`, *optional*): width the MP rule analysed.
        signal_rank (`int`, *optional*): the MP count before rounding and floors.
        n_samples (`int`, *optional*): calibration tokens (or positions) behind the covariance.
        sigma2, lambda_plus, threshold (`float`, *optional*): noise variance, bulk edge and the cut actually used.
        retained_variance (`float`, *optional*): share of the covariance's trace kept.
        estimator, tau, false_alarm: the spectral options that chose the rank.
        mp_rank, budget_rank, output_error (*optional*): with an output-error budget, the MP rule's rank, the
            smallest rank within the budget, and the relative output error at `rank`.
        extra (`dict`): keys this version does not know (kept, so a newer checkpoint's record round-trips).
    """

    kind: ClassVar[str] = ""
    rank: int
    dim: int | None = None
    signal_rank: int | None = None
    n_samples: int | None = None
    sigma2: float | None = None
    lambda_plus: float | None = None
    threshold: float | None = None
    retained_variance: float | None = None
    estimator: str | None = None
    tau: float | None = None
    false_alarm: float | None = None
    mp_rank: int | None = None
    budget_rank: int | None = None
    output_error: float | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "record") -> None:
        """Raise `ValueError` naming `where`, the field and its value if the record cannot describe a model."""
        _positive_int(where, "rank", self.rank)
        if self.dim is not None:
            _positive_int(where, "dim", self.dim)

    def to_dict(self) -> dict:
        """JSON-ready dict with `kind` first; unset (`None`) provenance is left out."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {"kind": self.kind, **{k: v for k, v in values.items() if v is not None}, **self.extra}


@dataclass(kw_only=True)
class ModuleRecord(ReductionRecord):
    """A reduced module at a path of the base model: its original `(in_features, out_features)` and whether the
    reduced module has a `bias` (the mean correction can give a bias-free layer one; `None`: as the original)."""

    in_features: int
    out_features: int
    bias: bool | None = None

    def validate(self, where: str = "record") -> None:
        super().validate(where)
        _positive_int(where, "in_features", self.in_features)
        _positive_int(where, "out_features", self.out_features)


@dataclass(kw_only=True)
class FFNRecord(ModuleRecord):
    """The inner width of a feed-forward block: `producers` (paths of the modules whose outputs form the inner
    width) and the consumer at the record's own path keep `rank` channels; `ffn_method` says how ("select"/"project")."""

    kind: ClassVar[str] = "ffn"
    producers: list[str]
    ffn_method: str | None = None

    def validate(self, where: str = "record") -> None:
        super().validate(where)
        if not self.producers or not all(isinstance(p, str) and p for p in self.producers):
            raise ValueError(f"`{where}.producers` must be a non-empty list of module paths, got {self.producers!r}.")


@dataclass(kw_only=True)
class MergeableRecord(ModuleRecord):
    """A layer factorised as `up(down(x))` of rank `rank`; `merged` once multiplied back into one dense layer (where
    that measured faster, `hf_rmtkd.latency`), with the timing that decided it in `latency`."""

    merged: bool = False
    latency: dict | None = None


@dataclass(kw_only=True)
class LinearRecord(MergeableRecord):
    """A linear layer factorised as `up(down(x))` of rank `rank` (or merged back, see [`MergeableRecord`])."""

    kind: ClassVar[str] = "linear"


@dataclass(kw_only=True)
class EmbeddingRecord(ModuleRecord):
    """An input token table `(in_features = V, out_features = d)` factorised as a `(V, rank)` table followed by a
    `rank -> d` linear map (`bias`: the mean correction of the dropped directions)."""

    kind: ClassVar[str] = "embedding"


@dataclass(kw_only=True)
class ConvRecord(MergeableRecord):
    """A convolution `(in_features, out_features)` channels factorised as a convolution with its own kernel to `rank`
    channels, then a `1 x 1` convolution back (`bias`: on the second, the mean correction of the dropped
    directions); or merged back into one convolution of the original geometry (see [`MergeableRecord`])."""

    kind: ClassVar[str] = "conv"


@dataclass(kw_only=True)
class HiddenRecord(ReductionRecord):
    """The width of the residual stream: `dim -> rank`.

    Args:
        config_overrides (`dict`): base-config values of the reduced model (`hidden_size`, or GPT-2's `n_embd`, and
            what goes with it);
            `from_pretrained` builds the base model with them.
        widths (`list[int]`, *optional*): every width reached, in order (progressive steps); `[rank]` for one step.
        first_mp_width (`int`, *optional*): the MP width of the first step (later steps never go below it).
        attention_width (`int`, *optional*): GPT-2 keeps its attention at this width (restored on reload).
    """

    kind: ClassVar[str] = "hidden"
    config_overrides: dict
    widths: list[int] | None = None
    first_mp_width: int | None = None
    attention_width: int | None = None

    def validate(self, where: str = "hidden_width") -> None:
        super().validate(where)
        if not isinstance(self.config_overrides, dict) or not self.config_overrides:
            raise ValueError(
                f"`{where}.config_overrides` must be a non-empty dict (the base-config values of the reduced width), "
                f"got {self.config_overrides!r}."
            )
        # GPT-2 names the width `n_embd`.
        width = self.config_overrides.get("hidden_size", self.config_overrides.get("n_embd"))
        if width is not None and width != self.rank:
            raise ValueError(f"`{where}.rank` ({self.rank}) differs from the width in `config_overrides` ({width}).")
        if self.dim is not None and self.rank > self.dim:
            raise ValueError(f"`{where}.rank` ({self.rank}) exceeds `dim` ({self.dim}).")


RECORD_KINDS: dict[str, type[ReductionRecord]] = {
    cls.kind: cls for cls in (FFNRecord, LinearRecord, EmbeddingRecord, ConvRecord, HiddenRecord)
}
MODULE_KINDS = ("ffn", "linear", "embedding", "conv")


def record_from_dict(values: dict | ReductionRecord, where: str = "record") -> ReductionRecord:
    """The typed record of a dict (as in `config.json`); a record is returned as is.

    Raises:
        `ValueError` naming `where`, the key and the value for an unknown kind, a missing field or a bad value.
    """
    if isinstance(values, ReductionRecord):
        values.validate(where)
        return values
    if not isinstance(values, dict):
        raise ValueError(f"`{where}` must be a dict, got {type(values).__name__}.")
    kind = values.get("kind")
    if kind not in RECORD_KINDS:
        raise ValueError(f"`{where}.kind` must be one of {tuple(RECORD_KINDS)}, got {kind!r}.")
    cls = RECORD_KINDS[kind]
    known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in values]
    if missing:
        raise ValueError(f"`{where}` ({kind}) is missing {missing}; a {kind} record needs {required}.")
    given = {k: v for k, v in values.items() if k in known}
    extra = {k: v for k, v in values.items() if k not in known and k != "kind"}
    # Built field by field rather than through `__init__`, so validation errors name `where` (the path).
    record = object.__new__(cls)
    for f in dataclasses.fields(cls):
        if f.name in given:
            value = given[f.name]
        else:
            value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        setattr(record, f.name, value)
    record.extra = extra
    record.validate(where)
    return record


def upgrade_records(reduced_modules: dict | None, hidden_width: Any, format_version: int | None):
    """`(reduced_modules, hidden_width)` as typed records of the current format, from any supported version.

    Version 1 (or none recorded: hf_rmtkd 0.1.0) kept the hidden width in `reduced_modules` under `"<hidden_size>"`
    with `in_features = out_features = dim`; it moves to its own field.

    Raises:
        `ValueError` for a version newer than this library's, or a record that does not validate.
    """
    version = 1 if format_version is None else format_version
    if not isinstance(version, int) or version < 1 or version > FORMAT_VERSION:
        raise ValueError(
            f"`format_version` {format_version!r} is not one this hf_rmtkd reads (1..{FORMAT_VERSION}): the checkpoint "
            "was written by a newer hf_rmtkd; upgrade it (pip install -U hf_rmtkd)."
        )
    modules = dict(reduced_modules or {})
    legacy = modules.pop(LEGACY_HIDDEN_KEY, None)
    if legacy is not None:
        if hidden_width is not None:
            raise ValueError(f"Both `hidden_width` and `reduced_modules[{LEGACY_HIDDEN_KEY!r}]` are set; keep one.")
        hidden_width = {k: v for k, v in legacy.items() if k not in ("in_features", "out_features")}
    records = {}
    for path, values in modules.items():
        record = record_from_dict(values, f"reduced_modules[{path!r}]")
        if record.kind not in MODULE_KINDS:
            raise ValueError(
                f"`reduced_modules[{path!r}].kind` must be one of {MODULE_KINDS}, got {record.kind!r} (the hidden "
                "width is `hidden_width`)."
            )
        records[path] = record
    hidden = record_from_dict(hidden_width, "hidden_width") if hidden_width is not None else None
    if hidden is not None and hidden.kind != "hidden":
        raise ValueError(f"`hidden_width.kind` must be 'hidden', got {hidden.kind!r}.")
    return records, hidden
