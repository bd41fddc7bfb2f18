"""`ResNetCifarConfig`: depth and widths of a CIFAR ResNet (He et al., 2016, section 4.2)."""

from __future__ import annotations

from transformers import PreTrainedConfig


class ResNetCifarConfig(PreTrainedConfig):
    r"""
    Configuration of a CIFAR ResNet: a 3x3 stem, three stages of `(depth - 2) / 6` basic blocks with `widths`
    channels, global average pooling and a linear classifier. Shortcuts are parameter-free (option A: stride-2
    subsampling plus zero channel padding), as in the checkpoints of akamaster/pytorch_resnet_cifar10.

    Args:
        depth (`int`, *optional*, defaults to 56): 6 n + 2 layers (20, 32, 44, 56, 110, ...).
        widths (`list[int]`, *optional*, defaults to `[16, 32, 64]`): channels of the three stages.
        num_channels (`int`, *optional*, defaults to 3): input channels.
        image_size (`int`, *optional*, defaults to 32): input height and width, in pixels.
        image_mean, image_std (`list[float]`, *optional*): per-channel normalisation the weights were trained with.
    """

    model_type = "resnet_cifar"

    depth: int = 56
    widths: list | None = None
    num_channels: int = 3
    image_size: int = 32
    image_mean: list | None = None
    image_std: list | None = None

    def __post_init__(self, **kwargs):
        self.widths = list(self.widths or [16, 32, 64])
        self.image_mean = list(self.image_mean or [0.485, 0.456, 0.406])
        self.image_std = list(self.image_std or [0.229, 0.224, 0.225])
        kwargs.setdefault("num_labels", 10)
        super().__post_init__(**kwargs)
        if self.depth < 8 or (self.depth - 2) % 6:
            raise ValueError(f"`depth` must be 6 n + 2 with n >= 1 (20, 32, 44, 56, 110, ...), got {self.depth}.")
        if len(self.widths) != 3 or any(w < 1 for w in self.widths):
            raise ValueError(f"`widths` must be three positive channel counts, got {self.widths}.")

    @property
    def blocks_per_stage(self) -> int:
        return (self.depth - 2) // 6
