"""Shared fixtures: tiny random configs per supported family (transformers' ModelTester sizes) and spiked data."""

from __future__ import annotations

import atexit
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path

from hub_server import start_server


# The Hub client reads HF_ENDPOINT once, when it is imported: point it at a loopback server before anything imports
# it. Every Hub call of the suite then goes to 127.0.0.1, never to the internet.
if "huggingface_hub" in sys.modules:
    raise RuntimeError("huggingface_hub was imported before tests/conftest.py could point it at the test Hub server.")
_HUB_ROOT = Path(tempfile.mkdtemp(prefix="hf-rmtkd-hub-"))
HUB = start_server(_HUB_ROOT / "storage")
atexit.register(HUB.stop)
os.environ["HF_ENDPOINT"] = HUB.url
os.environ["HF_TOKEN"] = "hf_testtoken"
os.environ["HF_HOME"] = str(_HUB_ROOT / "hf_home")
os.environ.pop("HF_HUB_OFFLINE", None)  # offline mode would block the loopback server too
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("HF_RMTKD_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

# Tiny sizes as in transformers' ModelTester classes: hidden 32, 2 layers, 4 heads, vocab 99.
TEXT_VOCAB = 99
FAMILIES = ("bert", "roberta", "distilbert", "mpnet", "gpt2", "llama", "vit")
DECODERS = ("gpt2", "llama")


def tiny_config(family: str, num_labels: int = 3):
    """A tiny random config of `family`, built locally (never from the Hub)."""
    import transformers as tf

    common = {"num_labels": num_labels}
    if family == "bert":
        return tf.BertConfig(
            vocab_size=TEXT_VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=64,
            **common,
        )
    if family == "roberta":
        return tf.RobertaConfig(
            vocab_size=TEXT_VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=64,
            pad_token_id=1,
            **common,
        )
    if family == "distilbert":
        return tf.DistilBertConfig(
            vocab_size=TEXT_VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64, **common
        )
    if family == "mpnet":
        return tf.MPNetConfig(
            vocab_size=TEXT_VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=64,
            **common,
        )
    if family == "gpt2":
        return tf.GPT2Config(
            vocab_size=TEXT_VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            n_inner=37,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            **common,
        )
    if family == "llama":
        return tf.LlamaConfig(
            vocab_size=TEXT_VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=37,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=0,
            **common,
        )
    if family == "vit":
        return tf.ViTConfig(
            image_size=16,
            patch_size=4,
            num_channels=3,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            **common,
        )
    raise ValueError(family)


def tiny_model(family: str, task: str = "base", seed: int = 0):
    """A tiny random model of `family` for `task` in {"base", "sequence", "token", "causal", "image"}."""
    import transformers as tf

    auto = {
        "base": tf.AutoModel,
        "sequence": tf.AutoModelForSequenceClassification,
        "token": tf.AutoModelForTokenClassification,
        "causal": tf.AutoModelForCausalLM,
        "image": tf.AutoModelForImageClassification,
    }[task]
    torch.manual_seed(seed)
    return auto.from_config(tiny_config(family)).eval()


def tiny_batches(
    family: str, n_batches: int = 6, batch_size: int = 8, seq_len: int = 12, seed: int = 0, pad: bool = True
):
    """Calibration batches for `family`: token ids with an attention mask (some padding), or pixel values."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        if family == "vit":
            batches.append({"pixel_values": torch.randn(batch_size, 3, 16, 16, generator=g)})
            continue
        ids = torch.randint(2, TEXT_VOCAB, (batch_size, seq_len), generator=g)
        mask = torch.ones(batch_size, seq_len, dtype=torch.long)
        if pad:
            lengths = torch.randint(seq_len // 2, seq_len + 1, (batch_size,), generator=g)
            mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def spiked_samples(d: int, n: int, spikes: list[float], sigma2: float = 1.0, seed: int = 0) -> torch.Tensor:
    """`n` samples of dimension `d` from N(0, sigma2 (I + sum_i spikes[i] e_i e_i^T)), rotated randomly; shape (n, d)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * math.sqrt(sigma2)
    for i, strength in enumerate(spikes):
        x[:, i] *= math.sqrt(1.0 + strength)
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return x @ rotation.T


def sample_eigenvalues(x: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the centred sample covariance of `x` of shape (n, d), descending."""
    x = x - x.mean(0)
    return torch.linalg.eigvalsh(x.T @ x / x.shape[0]).flip(0)


@pytest.fixture(autouse=True)
def _deprecations_are_errors():
    # As peft's conftest: our code must not lean on deprecated transformers behaviour.
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=FutureWarning, module=r"hf_rmtkd\..*")
        yield


def pytest_unconfigure(config):
    HUB.stop()
