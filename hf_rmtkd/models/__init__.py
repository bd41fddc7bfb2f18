"""Architectures hf_rmtkd owns because transformers has no equivalent (the CIFAR ResNets of He et al.)."""
