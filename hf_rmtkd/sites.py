"""Where a model can be reduced: FFN and conv-block inner widths, low-rank `nn.Linear` sites, the input embedding
table, factorised convolutions, peft-style matching; and the registry of site kinds ([`SITE_KINDS`])."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from torch import nn
from transformers.pytorch_utils import Conv1D

from .layers import LowRankConv2d, LowRankEmbedding, LowRankLinear


# Feed-forward blocks, as paths relative to their parent: (producers of the inner width, consumer of it).
# The inner activation is an elementwise function of the producers' outputs, so slicing them is exact.
FFN_PATTERNS: dict[str, tuple[tuple[str, ...], str]] = {
    "bert-style (BERT, RoBERTa, MPNet, ViT, ELECTRA)": (("intermediate.dense",), "output.dense"),
    "distilbert": (("ffn.lin1",), "ffn.lin2"),
    "gpt2": (("mlp.c_fc",), "mlp.c_proj"),
    "llama-style (Llama, Mistral, Qwen2, Gemma)": (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),
    "clip/phi-style": (("mlp.fc1",), "mlp.fc2"),
    "opt/bart-style": (("fc1",), "fc2"),
}
# Convolutional blocks: the inner channels are an elementwise function (BatchNorm, ReLU) of `conv1`'s output, so
# slicing channels is exact; the activation covariance is taken over spatial positions (the paper's CNN site).
CONV_PATTERNS: dict[str, tuple[tuple[str, ...], str]] = {
    "resnet basic block": (("conv1", "bn1"), "conv2"),
}
LINEAR_TYPES = (nn.Linear, Conv1D)
# Linear sites: dense layers, and earlier factorisations (refactorised from the dense map they compute).
REDUCIBLE_LINEAR_TYPES = (*LINEAR_TYPES, LowRankLinear)
CONV_TYPES = (nn.Conv2d, nn.BatchNorm2d)
# Embedding sites: the model's input token table (and an earlier factorisation of it, refactorised the same way).
EMBEDDING_TYPES = (nn.Embedding, LowRankEmbedding)
# Convolution sites (factorised): a dense convolution, or an earlier factorisation of one.
CONV_SITE_TYPES = (nn.Conv2d, LowRankConv2d)
LOW_RANK_TYPES = (LowRankLinear, LowRankEmbedding, LowRankConv2d)
DEFAULT_KINDS = ("ffn", "linear")
# How the convolutions of a CNN's blocks are reduced: "channels" narrows a block's inner channels (an "ffn" site of
# `CONV_PATTERNS`); "factorize" factorises every block convolution instead (a "conv" site each).
CONVOLUTIONS = ("channels", "factorize")


@dataclass(frozen=True)
class SiteKind:
    """What every module reading a site needs to know about its kind: the one place these rules live.

    Attributes:
        name (`str`): the kind, as in `Site.kind` and the records.
        reads_output (`bool`): the covariance is of the module's *output* (an embedding table, whose input is ids;
            a factorised convolution, whose best rank-`k` map keeps the top output directions), so the site's width
            is the module's output width and a rank-`k` cut leaves the tail eigenvalues as its output error.
    """

    name: str
    reads_output: bool = False


SITE_KINDS: dict[str, SiteKind] = {
    kind.name: kind
    for kind in (SiteKind("ffn"), SiteKind("linear"), SiteKind("embedding", True), SiteKind("conv", True))
}


def site_kinds(embeddings: bool = False, convolutions: str = "channels") -> tuple[str, ...]:
    """The site kinds a reduction selects by default: FFN and linear sites, the token table with `embeddings`, and
    every block convolution (factorised, instead of conv blocks' inner channels) with `convolutions="factorize"`.

    Raises:
        `ValueError` for a `convolutions` not in `CONVOLUTIONS`.
    """
    if convolutions not in CONVOLUTIONS:
        raise ValueError(f"`convolutions` must be one of {CONVOLUTIONS}, got {convolutions!r}.")
    kinds = (*DEFAULT_KINDS, "embedding") if embeddings else DEFAULT_KINDS
    return (*kinds, "conv") if convolutions == "factorize" else kinds


SUPPORTED_TYPES = (
    "torch.nn.Linear",
    "transformers.pytorch_utils.Conv1D",
    "torch.nn.Embedding",
    "torch.nn.Conv2d (convolutions='factorize')",
)
# Linear sites default to the repeated blocks: a path with a layer index. Heads, poolers and embeddings
# are left alone unless named explicitly.
_BLOCK_INDEX = re.compile(r"\.\d+\.")


@dataclass
class Site:
    """One reducible place in a model.

    Attributes:
        name (`str`): path of the consumer module; its input covariance drives the reduction.
        kind (`str`): a key of [`SITE_KINDS`]: `"ffn"` (shrink the inner width of a feed-forward block), `"linear"`
            (factorise), `"embedding"` (factorise the input token table) or `"conv"` (factorise a convolution); the
            last two are driven by their *output* covariance.
        producers (`list[str]`): for `"ffn"`, the modules whose outputs form the inner width.
        dim (`int`): width `d` of the consumer's input (the output width for a kind that reads outputs).
    """

    name: str
    kind: str
    dim: int
    producers: list[str] = field(default_factory=list)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """`(in_features, out_features)` of an `nn.Linear`, a GPT-2 `Conv1D` or a `LowRankLinear`; channels of an
    `nn.Conv2d`/`BatchNorm2d`/`LowRankConv2d`; `(num_embeddings, embedding_dim)` of an embedding table."""
    if isinstance(module, EMBEDDING_TYPES):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, (nn.Linear, LowRankLinear)):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    if isinstance(module, CONV_SITE_TYPES):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.BatchNorm2d):
        return module.num_features, module.num_features
    raise TypeError(
        f"Module of type {type(module).__name__} cannot be reduced; supported types are {', '.join(SUPPORTED_TYPES)}."
    )


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _block_types_match(modules: list[nn.Module], conv: bool) -> bool:
    if not conv:
        return all(isinstance(m, LINEAR_TYPES) for m in modules)
    convs = [m for m in modules if isinstance(m, nn.Conv2d)]
    return (
        isinstance(modules[-1], nn.Conv2d)
        and all(isinstance(m, CONV_TYPES) for m in modules)
        and all(m.groups == 1 for m in convs)
    )


def find_ffn_sites(model: nn.Module, conv_blocks: bool = True) -> list[Site]:
    """Every block inner width whose layout matches one of `FFN_PATTERNS` or (with `conv_blocks`) `CONV_PATTERNS`
    (kind `"ffn"`)."""
    patterns = [(p, c, False) for p, c in FFN_PATTERNS.values()]
    patterns += [(p, c, True) for p, c in CONV_PATTERNS.values()] if conv_blocks else []
    sites = []
    for parent_name, _ in model.named_modules():
        prefix = f"{parent_name}." if parent_name else ""
        for producers, consumer, conv in patterns:
            modules = [_get(model, prefix + rel) for rel in (*producers, consumer)]
            if any(m is None for m in modules) or not _block_types_match(modules, conv):
                continue
            widths = {linear_shape(m)[1] for m in modules[:-1]}
            inner = linear_shape(modules[-1])[0]
            if widths != {inner}:
                continue
            sites.append(Site(prefix + consumer, "ffn", inner, [prefix + p for p in producers]))
    return sites


def _low_rank_paths(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if name and isinstance(module, LOW_RANK_TYPES)]


def _tied_to_output(model: nn.Module, table: nn.Module) -> bool:
    """Whether `table` shares its weight with the model's output embeddings (a tied LM head)."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    weight = getattr(table, "weight", None)
    return output is not None and weight is not None and getattr(output, "weight", None) is weight


def embedding_site(model: nn.Module, name: str) -> Site:
    """The embedding site of the table at `name`.

    Raises:
        `ValueError` if the table is tied to the output head: factorising it would change the head too.
    """
    table = model.get_submodule(name)
    if _tied_to_output(model, table):
        raise ValueError(
            f"The embedding table {name!r} is tied to the output head of {type(model).__name__}: factorising it "
            "would change the head too. Embedding reduction needs untied input embeddings."
        )
    return Site(name, "embedding", table.embedding_dim)


def find_embedding_sites(model: nn.Module) -> list[Site]:
    """The model's input token table (`get_input_embeddings()`) as an embedding site, if it is one and is not tied
    to the output head; otherwise none."""
    get_input = getattr(model, "get_input_embeddings", None)
    try:
        table = get_input() if callable(get_input) else None
    except NotImplementedError:
        table = None
    if not isinstance(table, EMBEDDING_TYPES) or _tied_to_output(model, table):
        return []
    return [embedding_site(model, name) for name, module in model.named_modules() if module is table][:1]


def conv_site(model: nn.Module, name: str) -> Site:
    """The conv site of the convolution at `name` (its width is the output channels, whose covariance drives it).

    Raises:
        `ValueError` for a grouped or depthwise convolution (its factorisation would mix the groups).
    """
    conv = model.get_submodule(name)
    if getattr(conv, "groups", 1) != 1:
        raise ValueError(
            f"The convolution {name!r} has groups={conv.groups}: only ungrouped convolutions (groups=1) are factorised."
        )
    return Site(name, "conv", linear_shape(conv)[1])


def find_conv_sites(model: nn.Module) -> list[Site]:
    """Every ungrouped `nn.Conv2d` (or `LowRankConv2d`) inside the repeated blocks (a path with a layer index), kind
    `"conv"`; the stem and the parts of a factorisation never are."""
    low_rank = _low_rank_paths(model)
    return [
        conv_site(model, name)
        for name, module in model.named_modules()
        if isinstance(module, CONV_SITE_TYPES)
        and getattr(module, "groups", 1) == 1
        and not _inside(name, low_rank)
        and _BLOCK_INDEX.search(f".{name}.")
    ]


def _inside(name: str, parents: list[str]) -> bool:
    return any(name.startswith(parent + ".") for parent in parents)


def find_sites(model: nn.Module, kinds: tuple[str, ...] = DEFAULT_KINDS) -> list[Site]:
    """All default reduction sites of `model`, in forward (module registration) order.

    FFN sites come from `FFN_PATTERNS`; linear sites are the remaining `nn.Linear`/`Conv1D` modules inside the
    repeated blocks (paths with a layer index), so output heads, poolers and embeddings are never touched by default.
    With `"embedding"` in `kinds`, the input token table is a site too (when it is not tied to the output head).
    With `"conv"` in `kinds`, every block convolution is a conv site (factorised) and conv blocks are no FFN sites.
    A `LowRankLinear` (an earlier factorisation) is one linear site; its `down`/`up` parts never are, so compressing
    a compressed model never nests factorisations.
    """
    conv_blocks = "conv" not in kinds
    ffn = find_ffn_sites(model, conv_blocks) if "ffn" in kinds else []
    taken = {name for site in find_ffn_sites(model, conv_blocks) for name in (site.name, *site.producers)}
    low_rank = _low_rank_paths(model)
    sites = {site.name: site for site in ffn}
    if "conv" in kinds:
        sites.update({site.name: site for site in find_conv_sites(model) if site.name not in taken})
    if "linear" in kinds:
        for name, module in model.named_modules():
            if (
                isinstance(module, REDUCIBLE_LINEAR_TYPES)
                and name not in taken
                and not _inside(name, low_rank)
                and _BLOCK_INDEX.search(f".{name}.")
            ):
                sites[name] = Site(name, "linear", linear_shape(module)[0])
    if "embedding" in kinds:
        sites.update({site.name: site for site in find_embedding_sites(model)})
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(sites.values(), key=lambda s: order[s.name])


def _matches(name: str, target: str | list[str]) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(_entry_matches(name, t) for t in target)


def _entry_matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith(f".{entry}")


def _no_match_error(model: nn.Module, wanted: str | list[str], hint: str = "", label: str = "") -> ValueError:
    names = [n for n, _ in model.named_modules() if n]
    entries = [wanted] if isinstance(wanted, str) else list(wanted)
    close = sorted(
        {m for t in entries for m in difflib.get_close_matches(t, names + [n.split(".")[-1] for n in names], 5)}
    )
    return ValueError(
        f"{label or '`target_modules`='}{wanted!r} matches no module of {type(model).__name__} that can be reduced{hint}. "
        f"Close matches: {close or 'none'}."
    )


def _why_not(model: nn.Module, target: str | list[str], low_rank: list[str]) -> str:
    """Why modules matched by `target` are no sites (parts of a `LowRankLinear`, or containers), for the error."""
    matched = [(n, m) for n, m in model.named_modules() if n and _matches(n, target)]
    if matched and all(_inside(n, low_rank) for n, _ in matched):
        return (
            " (it names only the down/up parts of LowRankLinear layers, which are never sites: name the LowRankLinear "
            "itself to reduce it further)"
        )
    if matched:
        kinds = sorted({type(m).__name__ for _, m in matched})
        return f" (it names only {', '.join(kinds)} modules, which are no sites: name the linear layers inside)"
    return ""


def select_sites(
    model: nn.Module, target_modules: str | list[str] | None = None, kinds: tuple[str, ...] = DEFAULT_KINDS
) -> list[Site]:
    """Sites chosen by `target_modules`, with peft's semantics.

    Args:
        model (`nn.Module`): the model to search.
        target_modules (`str` or `list[str]`, *optional*): a regex matched against the full module path, or a list of
            name suffixes (`"query"` matches `encoder.layer.0.attention.self.query`). An FFN site matches through its
            consumer or any producer. A named module that is no default site but is an `nn.Linear` (or a
            `LowRankLinear`) becomes a linear site, an `nn.Embedding` (or `LowRankEmbedding`) an embedding site; the
            `down`/`up` parts of a factorisation never do. `None` selects every default site of `kinds`; an empty
            list selects none.
        kinds (`tuple[str, ...]`, *optional*): site kinds considered when `target_modules` is `None`; with `"conv"`
            among them, a named `nn.Conv2d` (or `LowRankConv2d`) is a conv site and conv blocks are no FFN sites.

    Raises:
        `ValueError` if `target_modules` (a regex), or any entry of the list, selects no site (with close matches),
        or if `"embedding"` is asked for a model without an untied input table; `TypeError` if it names a module of
        an unsupported type.
    """
    if target_modules is None:
        sites = find_sites(model, kinds)
        if "embedding" in kinds and not any(site.kind == "embedding" for site in sites):
            raise ValueError(
                f"Embedding reduction was asked for, but {type(model).__name__} has no input token table that can be "
                "factorised (none found by `get_input_embeddings()`, or it is tied to the output head)."
            )
        return sites
    if isinstance(target_modules, (list, tuple)) and not target_modules:
        return []
    ffn = find_ffn_sites(model, conv_blocks="conv" not in kinds)
    low_rank = _low_rank_paths(model)
    in_ffn = {name for site in ffn for name in (site.name, *site.producers)}
    chosen = {s.name: s for s in ffn if any(_matches(n, target_modules) for n in (s.name, *s.producers))}
    for name, module in model.named_modules():
        if not name or name in in_ffn or _inside(name, low_rank) or not _matches(name, target_modules):
            continue
        if isinstance(module, REDUCIBLE_LINEAR_TYPES):
            chosen[name] = Site(name, "linear", linear_shape(module)[0])
        elif isinstance(module, EMBEDDING_TYPES):
            chosen[name] = embedding_site(model, name)
        elif isinstance(module, CONV_SITE_TYPES) and "conv" in kinds:
            chosen[name] = conv_site(model, name)
        elif not any(isinstance(child, LINEAR_TYPES) for child in module.modules()):
            raise TypeError(
                f"`target_modules` selects {name!r} of type {type(module).__name__}, which cannot be reduced; "
                f"supported types are {', '.join(SUPPORTED_TYPES)} and the blocks of {', '.join([*FFN_PATTERNS, *CONV_PATTERNS])}."
            )
    if not chosen:
        raise _no_match_error(model, target_modules, _why_not(model, target_modules, low_rank))
    if not isinstance(target_modules, str):
        # Every entry must select something: a typo beside a valid name would otherwise be silently ignored.
        for entry in target_modules:
            paths = [p for site in chosen.values() for p in (site.name, *site.producers)]
            if not any(_entry_matches(p, entry) for p in paths):
                hint = _why_not(model, [entry], low_rank)
                raise _no_match_error(model, entry, hint, label="`target_modules` entry ")
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(chosen.values(), key=lambda s: order[s.name])
