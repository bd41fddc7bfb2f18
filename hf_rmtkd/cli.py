"""`rmtkd`: the command line.

    rmtkd analyze MODEL --data FILE [--plots DIR] [spectral options]
    rmtkd compress MODEL --data FILE --output DIR [--hidden_width] [--embeddings] [--target_modules a b]
        [--max_output_error 0.05] [--convolutions factorize]
    rmtkd push DIR REPO_ID [--private]

Arguments come from the same dataclasses as the Python API ([`SpectralOptions`] for every spectral option), parsed by
`transformers.HfArgumentParser`; `rmtkd <command> --help` lists them. Data ([`~hf_rmtkd.cli_data`]): CSV, TSV, JSON
lines, text or parquet files, a `datasets` folder written by `save_to_disk`, or a folder of image files; a model that
takes `pixel_values` is calibrated on images through its image processor (`--convolutions factorize` factorises a
CNN's block convolutions), any other on text through its tokenizer. MODEL may be a sentence-transformers folder (one
with a `modules.json`): its transformer is analysed or compressed and `--output` is written with
`SentenceTransformer.save`.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from transformers import AutoConfig, AutoTokenizer, HfArgumentParser

from .analysis import SpectralOptions, analyze
from .cli_data import DataArguments, batches, image_batches, image_processor, read_images, read_texts
from .compression import compress
from .processing import find_processing_class
from .sentence_models import compress_sentence_transformer, is_sentence_transformer, transformer_module


logger = logging.getLogger(__name__)
COMMANDS = ("analyze", "compress", "push")
# The Auto class of a checkpoint, from the suffix of its architecture's name.
_TASK_CLASSES = {
    "ForSequenceClassification": "AutoModelForSequenceClassification",
    "ForTokenClassification": "AutoModelForTokenClassification",
    "ForCausalLM": "AutoModelForCausalLM",
    "LMHeadModel": "AutoModelForCausalLM",
    "ForImageClassification": "AutoModelForImageClassification",
}


_CONVOLUTIONS_HELP = (
    "How a CNN's block convolutions are reduced: 'channels' (each block's inner channels) or 'factorize' (every "
    "block convolution factorised to its MP rank)."
)


@dataclass
class AnalyzeArguments:
    plots: str | None = field(default=None, metadata={"help": "Folder for one spectrum PNG per site."})
    target_modules: list[str] | None = field(default=None, metadata={"help": "Site name suffixes; default all."})
    convolutions: str = field(default="channels", metadata={"help": _CONVOLUTIONS_HELP})


@dataclass
class CompressArguments:
    output: str = field(metadata={"help": "Folder the compressed checkpoint (and tokenizer) is written to."})
    hidden_width: bool = field(default=False, metadata={"help": "Also reduce the width of the residual stream."})
    embeddings: bool = field(default=False, metadata={"help": "Also factorise the input token table (not tied ones)."})
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "Site name suffixes; default all; pass 'none' for the hidden width only."}
    )
    ffn_method: str = field(default="select", metadata={"help": "FFN surgery: 'select' or 'project'."})
    convolutions: str = field(default="channels", metadata={"help": _CONVOLUTIONS_HELP})


def load_model(name_or_path: str):
    """The checkpoint with the Auto class of its task (its `architectures`), in eval mode."""
    import transformers

    config = AutoConfig.from_pretrained(name_or_path)
    architecture = getattr(config, "base_architecture", None) or (config.architectures or [""])[0]
    auto = next((a for suffix, a in _TASK_CLASSES.items() if architecture.endswith(suffix)), "AutoModel")
    return getattr(transformers, auto).from_pretrained(name_or_path).eval()


def _calibration(model_path: str, model, data: DataArguments):
    """`(processing_class, batches)`: images through the image processor for a model that takes `pixel_values`,
    else text through the tokenizer."""
    if model.main_input_name == "pixel_values":
        # An RMTKD checkpoint (compressed again) keeps the base model's normalisation in its inner model's config.
        inner = getattr(model, "rmtkd_inner_model", model)
        process, processor = image_processor(model_path, inner.config)
        return processor, image_batches(process, read_images(data), data)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, batches(tokenizer, read_texts(data), data)


def _sentence_transformer(model_path: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_path, device="cpu")


def run_analyze(model_path: str, argv: list[str]) -> None:
    data, command, options = parser_for("analyze").parse_args_into_dataclasses(argv)
    if is_sentence_transformer(model_path):
        module = transformer_module(_sentence_transformer(model_path))
        model, calibration = module.model, batches(module.tokenizer, read_texts(data), data)
    else:
        model = load_model(model_path)
        _, calibration = _calibration(model_path, model, data)
    report = analyze(
        model, calibration, command.target_modules, convolutions=command.convolutions, progress=True, **vars(options)
    )
    print(
        report.to_pandas()[["module", "kind", "dim", "rank", "sigma2", "lambda_plus", "retained_variance"]].to_string(
            index=False
        )
    )
    if command.plots:
        paths = report.plot(command.plots)
        print(f"{len(paths)} spectrum plots in {command.plots}")


def run_compress(model_path: str, argv: list[str]) -> None:
    data, command, options = parser_for("compress").parse_args_into_dataclasses(argv)
    targets = [] if command.target_modules == ["none"] else command.target_modules
    if is_sentence_transformer(model_path):
        model = _sentence_transformer(model_path)
        before = sum(p.numel() for p in model.parameters())
        compress_sentence_transformer(
            model, read_texts(data), batch_size=data.batch_size, target_modules=targets, ffn_method=command.ffn_method,
            hidden_width=command.hidden_width, embeddings=command.embeddings, **vars(options),
        )  # fmt: skip
        model.save(command.output)
        after = sum(p.numel() for p in model.parameters())
        print(f"SentenceTransformer: {len(transformer_module(model).model.config.ranks())} reductions; parameters "
              f"{before:,} -> {after:,} ({1 - after / before:.1%} fewer); written to {command.output}")  # fmt: skip
        return
    model = load_model(model_path)
    processing, calibration = _calibration(model_path, model, data)
    before = model.num_parameters()
    compressed = compress(
        model,
        calibration,
        target_modules=targets,
        ffn_method=command.ffn_method,
        hidden_width=command.hidden_width,
        embeddings=command.embeddings,
        convolutions=command.convolutions,
        processing_class=processing,
        **vars(options),
    )
    compressed.save_pretrained(command.output)
    after = compressed.num_parameters()
    print(f"{len(compressed.config.ranks())} reductions; parameters {before:,} -> {after:,} "
          f"({1 - after / before:.1%} fewer); written to {command.output}")  # fmt: skip


def run_push(folder: str, argv: list[str]) -> None:
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: rmtkd push DIR REPO_ID [--private]")
    repo_id, private = argv[0], "--private" in argv[1:]
    model = load_model(folder)
    # The tokenizer or image processor saved beside the checkpoint goes to the Hub with it.
    model.processing_class = find_processing_class(model)
    commit = model.push_to_hub(repo_id, private=private or None)
    print(f"pushed {folder} to {repo_id} ({getattr(commit, 'oid', commit)})")


def parser_for(command: str) -> HfArgumentParser:
    """The argument parser of `command` (after its positional argument)."""
    types = {"analyze": (DataArguments, AnalyzeArguments, SpectralOptions),
             "compress": (DataArguments, CompressArguments, SpectralOptions)}  # fmt: skip
    return HfArgumentParser(types[command], prog=f"rmtkd {command} MODEL")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `rmtkd` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise SystemExit(f"rmtkd: unknown command {command!r}; one of {COMMANDS} (rmtkd --help).")
    if command != "push" and rest[:1] in (["-h"], ["--help"]):
        parser_for(command).print_help()
        return
    if not rest or rest[0].startswith("-"):
        raise SystemExit(
            f"usage: rmtkd {command} {'DIR REPO_ID' if command == 'push' else 'MODEL'} ... (rmtkd --help)"
        )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    {"analyze": run_analyze, "compress": run_compress, "push": run_push}[command](rest[0], rest[1:])


if __name__ == "__main__":
    main()
