"""Our ResNet50 (He et al., 2016, "Deep Residual Learning for Image Recognition").

Written for this project after reading torchvision's ``models/resnet.py``. It is the "v1.5"
variant torchvision and most published numbers use: in each bottleneck the stride sits on
the 3x3 convolution, not the first 1x1, which costs a little compute and gains ~0.5% top-1.

Parameter and buffer names match torchvision's exactly (``conv1``, ``bn1``, ``layer1.0.
downsample.0`` ...), so torchvision-format checkpoints load with ``strict=True`` and
``load_init_weights`` can start a run from one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from labctl.worker.engine import DataError

#: Bottleneck blocks per stage for the 50-layer network (3 + 4 + 6 + 3 blocks x 3 convs + 2).
RESNET50_STAGES = (3, 4, 6, 3)
#: Width of the 3x3 convolution in each stage; a block's output is ``expansion`` times wider.
STAGE_WIDTHS = (64, 128, 256, 512)
#: Prefixes that wrappers add to state-dict keys: DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every convolution is followed by BatchNorm, whose shift makes a bias redundant.
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1,
                     bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride) -> 1x1 expand, plus the identity shortcut."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = conv1x1(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        # In-place ReLU saves one activation-sized allocation per use; autograd allows it
        # because BatchNorm's backward does not need its own output.
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        # The projection runs last, so its (4x wider) output is not held through the branch.
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class ResNet(nn.Module):
    """A bottleneck ResNet: 7x7 stem, four stages, global average pool, linear classifier."""

    def __init__(self, stages: tuple[int, ...] = RESNET50_STAGES, num_classes: int = 1000,
                 zero_init_residual: bool = False):
        super().__init__()
        self.in_channels = 64  # channels entering the next stage; _make_layer advances it
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        # The first stage keeps the resolution (the stem already divided it by 4).
        self.layer1 = self._make_layer(STAGE_WIDTHS[0], stages[0], stride=1)
        self.layer2 = self._make_layer(STAGE_WIDTHS[1], stages[1], stride=2)
        self.layer3 = self._make_layer(STAGE_WIDTHS[2], stages[2], stride=2)
        self.layer4 = self._make_layer(STAGE_WIDTHS[3], stages[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(STAGE_WIDTHS[3] * Bottleneck.expansion, num_classes)
        self._init_weights(zero_init_residual)

    def _make_layer(self, width: int, blocks: int, stride: int) -> nn.Sequential:
        out_channels = width * Bottleneck.expansion
        downsample = None
        if stride != 1 or self.in_channels != out_channels:
            # Projection shortcut (option B of the paper) where the shape changes.
            downsample = nn.Sequential(conv1x1(self.in_channels, out_channels, stride),
                                       nn.BatchNorm2d(out_channels))
        layers = [Bottleneck(self.in_channels, width, stride, downsample)]
        self.in_channels = out_channels
        layers += [Bottleneck(out_channels, width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # He et al. (2015): keeps activation variance constant through ReLU layers;
                # fan_out preserves the variance of the gradients in the backward pass.
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            # Goyal et al. (2017): each residual branch starts as zero, so every block begins
            # as the identity and very deep networks train more easily at large batch sizes.
            for module in self.modules():
                if isinstance(module, Bottleneck):
                    nn.init.zeros_(module.bn3.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(num_classes: int = 1000, zero_init_residual: bool = False) -> ResNet:
    return ResNet(RESNET50_STAGES, num_classes=num_classes, zero_init_residual=zero_init_residual)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The tensors of a torchvision-format checkpoint: a bare state_dict, or a dict holding
    one under "model" or "state_dict" (torchvision's reference scripts, our own checkpoints).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"expected init weights checkpoint at {p}")
    # weights_only: a checkpoint from the internet must not be able to run code on unpickling.
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, a truncated one, or pickled code
        raise DataError(f"cannot read init weights {p}: not a torch checkpoint of tensors "
                        f"({type(exc).__name__})") from None
    for key in ("model", "state_dict"):
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
            break
    if not isinstance(blob, dict) or not all(isinstance(v, Tensor) for v in blob.values()):
        raise DataError(f"expected a state_dict of tensors in {p}")
    state = {}
    for key, value in blob.items():
        for prefix in WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        state[key] = value
    return state


def load_init_weights(model: nn.Module, path: str | os.PathLike[str], num_classes: int) -> bool:
    """Start ``model`` from the checkpoint at ``path``; returns True if the classifier was
    replaced because the checkpoint has a different class count (e.g. ImageNet's 1000 for
    Stanford Cars' 196). Every other tensor must match by name and shape.
    """
    state = read_state_dict(path)
    replace_fc = "fc.weight" in state and state["fc.weight"].shape[0] != num_classes
    if replace_fc:
        # Keep the model's own freshly initialised fc: the old one maps to the wrong classes.
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape, e.g. another ResNet depth
        raise DataError(f"{path} does not fit resnet50: {str(exc).splitlines()[-1].strip()}") \
            from None
    missing = [k for k in missing if not (replace_fc and k.startswith("fc."))]
    if missing or unexpected:
        raise DataError(f"{path} does not fit resnet50: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
    return replace_fc
