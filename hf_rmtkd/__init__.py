"""hf_rmtkd: RMT-KD (random-matrix-theoretic compression with self-distillation) for Hugging Face models."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .analysis import SiteReport, SpectralOptions, SpectralReport, analyze
from .budget_search import BudgetTry, search_output_error
from .compression import compress, to_rmtkd
from .configuration_rmtkd import RMTKDConfig
from .latency import merge_low_rank, optimize_for_latency
from .layers import LowRankConv2d, LowRankEmbedding, LowRankLinear
from .modeling_rmtkd import (
    RMTKDForCausalLM,
    RMTKDForImageClassification,
    RMTKDForSequenceClassification,
    RMTKDForTokenClassification,
    RMTKDModel,
    RMTKDPreTrainedModel,
)
from .models.resnet_cifar import ResNetCifarConfig, ResNetCifarForImageClassification
from .mp_law import fit_spectrum, mp_density, mp_edges
from .sentence_models import compress_sentence_transformer, distill_sentence_transformer
from .sentence_trainer import RMTKDSentenceTransformerTrainer, SentenceCollator
from .trainer import RMTKDTrainer
from .training_args import RMTKDTrainingArguments


__version__ = "0.1.0"


def _register() -> None:
    """Make `AutoConfig` and the `AutoModel*` classes resolve `model_type="rmtkd"` checkpoints."""
    AutoConfig.register("rmtkd", RMTKDConfig, exist_ok=True)
    AutoConfig.register("resnet_cifar", ResNetCifarConfig, exist_ok=True)
    AutoModelForImageClassification.register(ResNetCifarConfig, ResNetCifarForImageClassification, exist_ok=True)
    for auto, cls in (
        (AutoModel, RMTKDModel),
        (AutoModelForSequenceClassification, RMTKDForSequenceClassification),
        (AutoModelForTokenClassification, RMTKDForTokenClassification),
        (AutoModelForCausalLM, RMTKDForCausalLM),
        (AutoModelForImageClassification, RMTKDForImageClassification),
    ):
        auto.register(RMTKDConfig, cls, exist_ok=True)


_register()

__all__ = [
    "BudgetTry",
    "LowRankConv2d",
    "LowRankEmbedding",
    "LowRankLinear",
    "RMTKDConfig",
    "RMTKDForCausalLM",
    "RMTKDForImageClassification",
    "RMTKDForSequenceClassification",
    "RMTKDForTokenClassification",
    "RMTKDModel",
    "RMTKDPreTrainedModel",
    "RMTKDSentenceTransformerTrainer",
    "RMTKDTrainer",
    "RMTKDTrainingArguments",
    "ResNetCifarConfig",
    "ResNetCifarForImageClassification",
    "SentenceCollator",
    "SiteReport",
    "SpectralOptions",
    "SpectralReport",
    "analyze",
    "compress",
    "compress_sentence_transformer",
    "distill_sentence_transformer",
    "fit_spectrum",
    "mp_density",
    "merge_low_rank",
    "mp_edges",
    "optimize_for_latency",
    "search_output_error",
    "to_rmtkd",
]
