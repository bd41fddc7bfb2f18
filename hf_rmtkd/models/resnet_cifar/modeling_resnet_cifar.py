"""CIFAR ResNet as a `PreTrainedModel`; module names match the original checkpoints, so they load with no missing key."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

from .configuration_resnet_cifar import ResNetCifarConfig


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the option-A shortcut, then ReLU.

    The inner width (the output channels of `conv1`/`bn1`, the input channels of `conv2`) is what RMT-KD reduces;
    `forward` does not depend on it, so a block whose three modules were replaced by narrower ones still runs.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride, self.pad = stride, (planes - in_planes) // 2

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad, self.pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifarForImageClassification(PreTrainedModel):
    """CIFAR ResNet-`depth` image classifier.

    Inputs `pixel_values` of shape `(batch_size, num_channels, height, width)`, normalised with
    `config.image_mean`/`config.image_std`; outputs `logits` of shape `(batch_size, num_labels)` and, with `labels`,
    the cross-entropy `loss`.
    """

    config_class = ResNetCifarConfig
    base_model_prefix = "resnet"
    main_input_name = "pixel_values"
    _no_split_modules = ["BasicBlock"]

    def __init__(self, config: ResNetCifarConfig):
        super().__init__(config)
        widths = config.widths
        self.conv1 = nn.Conv2d(config.num_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for index, planes in enumerate(widths):
            blocks = []
            for block in range(config.blocks_per_stage):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            setattr(self, f"layer{index + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(widths[-1], config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            module.reset_running_stats()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput:
        """`hidden_states` (with `output_hidden_states=True`): the stem's output and every block's output, each of
        shape `(batch_size, channels, height, width)` (the block outputs keep their width under RMT-KD's channel
        reductions, so a student's feature maps compare directly with its teacher's)."""
        out = F.relu(self.bn1(self.conv1(pixel_values)))
        states = [out]
        for stage in (self.layer1, self.layer2, self.layer3):
            for block in stage:
                out = block(out)
                states.append(out)
        logits = self.linear(out.mean(dim=(2, 3)))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        hidden = tuple(states) if output_hidden_states else None
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=hidden)


def load_original_checkpoint(path: str | Path, depth: int | None = None) -> ResNetCifarForImageClassification:
    """Build a CIFAR ResNet from an akamaster/pytorch_resnet_cifar10 checkpoint (`resnet20-*.th`, ...).

    Args:
        path (`str` or `Path`): the `.th` file, a dict with `state_dict` whose keys carry DataParallel's `module.`.
        depth (`int`, *optional*): the depth; by default read from the number of blocks in the checkpoint.

    Raises:
        `ValueError` if the checkpoint has missing or unexpected keys for that depth.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in checkpoint.get("state_dict", checkpoint).items()}
    if depth is None:
        blocks = {k.split(".")[1] for k in state if k.startswith("layer1.")}
        depth = 6 * len(blocks) + 2
    model = ResNetCifarForImageClassification(ResNetCifarConfig(depth=depth))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match a CIFAR ResNet-{depth}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}."
        )
    return model.eval()
