"""CIFAR ResNets (He et al., 2016, option-A shortcuts), as a transformers image classifier."""

from .configuration_resnet_cifar import ResNetCifarConfig
from .modeling_resnet_cifar import ResNetCifarForImageClassification, load_original_checkpoint


__all__ = ["ResNetCifarConfig", "ResNetCifarForImageClassification", "load_original_checkpoint"]
