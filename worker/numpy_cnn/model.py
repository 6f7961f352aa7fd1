"""A sequential network of NumPy layers, its npz weights, and the default CNN.

The default network (:func:`build_default_cnn`), for an input of C channels and H x W pixels::

    Conv2D(C, c1, 3, padding=1) -> ReLU -> MaxPool2D(2)       # (c1, H/2, W/2)
    Conv2D(c1, c2, 3, padding=1) -> ReLU -> MaxPool2D(2)      # (c2, H/4, W/4)
    Flatten -> Linear(c2 * (H/4) * (W/4), hidden) -> ReLU -> Linear(hidden, classes)

    grey images under 64 px (digits 8x8, MNIST 28x28):   c1=16, c2=32, hidden=128
    colour images or 64 px and up (e.g. 3x64x64):        c1=32, c2=64, hidden=256

Sizes halve with floor division, as torch. Weights use He (Kaiming) normal initialisation
from the numpy Generator passed in, biases start at zero. Parameter names follow a torch
``nn.Sequential`` of the same layers ("0.weight", "3.weight", "7.weight", "9.weight"), so a
torch model's ``state_dict`` loads directly.

Any network :class:`Sequential` composes runs on the fast path: each Conv2D with the
activation (ReLU/Sigmoid) and MaxPool2D right after it is one threaded block on NHWC arrays
(:class:`blocks.ConvBlock`; the default network's stride-1 conv -> ReLU -> 2x2 pool triples
use the tuned :class:`fused.ConvReLUPool`), each Linear with its activation one
:class:`blocks.DenseBlock`; ``fuse=False`` runs the plain layers one by one. Consecutive
conv blocks run forward (and backward) as one pipeline over the batch
(:func:`parallel.run_stages`): a chunk of images moves on to the next block without
waiting for the rest of the batch.
"""

from __future__ import annotations

import os
from typing import BinaryIO

import numpy as np

from labctl.worker.numpy_cnn.allocator import keep_freed_memory
from labctl.worker.numpy_cnn.blocks import ACTIVATIONS, ConvBlock, DenseBlock
from labctl.worker.numpy_cnn.fused import ConvReLUPool, fusable
from labctl.worker.numpy_cnn.layers import Conv2D, Flatten, Layer, Linear, MaxPool2D, ReLU, _pair
from labctl.worker.numpy_cnn.parallel import run_stages

#: Run consecutive conv blocks as one pipeline (parallel.run_stages); False runs each
#: block's chunk loop on its own, which the tests compare against.
PIPELINE_BLOCKS = True

Block = ConvBlock | ConvReLUPool | DenseBlock


def _to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def _to_nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


class Sequential:
    """Layers applied in order. forward x: (N, C, H, W) (or (N, D)) -> the last layer's output.

    ``layers`` is the public list of per-layer objects; ``fuse=True`` groups them into
    blocks over the same parameters (:func:`plan_steps`). Making one tunes malloc for the
    process once (:func:`allocator.keep_freed_memory`): every step reuses its freed arrays.
    """

    def __init__(self, *layers: Layer, fuse: bool = True) -> None:
        keep_freed_memory()
        self.layers = list(layers)
        self.fuse = fuse
        self._steps = plan_steps(self.layers) if fuse else list(self.layers)

    @property
    def steps(self) -> list[Layer | Block]:
        """What forward runs, in order: blocks and the remaining plain layers."""
        return list(self._steps)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """x: (N, C, H, W) -> output, e.g. logits (N, classes). ``train=False`` (evaluation)
        skips what backward needs and leaves the last training forward's caches intact."""
        # Plain layers always cache; an evaluation forward puts their caches back after.
        saved = None if train else [layer.cache for layer in self.layers]
        channels_last = False  # conv blocks run on NHWC; other steps on NCHW
        for run in self._runs(range(len(self._steps))):
            wants_nhwc = getattr(run[0], "channels_last", False)
            if wants_nhwc != channels_last:
                x = _to_nhwc(x) if wants_nhwc else _to_nchw(x)
                channels_last = wants_nhwc
            if len(run) > 1:
                stages = []
                for step in run:
                    stages.append(step.forward_stage(x, train))
                    x = stages[-1].output
                run_stages(stages)
            else:
                step = run[0]
                x = step.forward(x) if isinstance(step, Layer) else step.forward(x, train)
        if saved is not None:
            for layer, cache in zip(self.layers, saved, strict=True):
                layer.cache = cache
        return _to_nchw(x) if channels_last else x

    def backward(self, grad_out: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """grad_out: d loss / d output, shaped like forward's output (e.g. (N, K) logits) ->
        (N, C, H, W) d loss / d input (None if not ``input_grad``, which lets a first
        block skip its input gradient). Adds into every layer's grads."""
        grad = grad_out
        channels_last = False  # forward returned NCHW
        for run in self._runs(range(len(self._steps) - 1, -1, -1)):
            wants_nhwc = getattr(run[0], "channels_last", False)
            if wants_nhwc != channels_last:
                grad = _to_nhwc(grad) if wants_nhwc else _to_nchw(grad)
                channels_last = wants_nhwc
            last = self._steps.index(run[-1]) == 0  # the network's first step
            if len(run) > 1:
                stages = []
                for step in run:
                    wanted = input_grad or step is not self._steps[0]
                    stages.append(step.backward_stage(grad, input_grad=wanted))
                    grad = stages[-1].output
                run_stages(stages)
            else:
                step = run[0]
                if isinstance(step, Layer):
                    grad = step.backward(grad)
                else:
                    grad = step.backward(grad, input_grad=input_grad or not last)
            if grad is None:
                return None
        return _to_nchw(grad) if channels_last else grad

    def _runs(self, order: range) -> list[list[Layer | Block]]:
        """The steps in ``order``, consecutive blocks that run as :class:`parallel.Stage` s
        grouped into one list (one pipeline, see :func:`parallel.run_stages`), any other
        step alone."""
        runs: list[list[Layer | Block]] = []
        for index in order:
            step = self._steps[index]
            staged = PIPELINE_BLOCKS and hasattr(step, "forward_stage")
            if staged and runs and hasattr(runs[-1][-1], "forward_stage"):
                runs[-1].append(step)
            else:
                runs.append([step])
        return runs

    def zero_grad(self) -> None:
        for layer in self.layers:
            layer.zero_grad()

    def named_parameters(self) -> list[tuple[str, np.ndarray]]:
        """[("0.weight", array), ...] in torch ``nn.Sequential`` naming."""
        return [(f"{i}.{key}", value) for i, layer in enumerate(self.layers)
                for key, value in layer.params.items()]

    def num_parameters(self) -> int:
        return sum(value.size for _, value in self.named_parameters())

    def state_dict(self) -> dict[str, np.ndarray]:
        return {name: value.copy() for name, value in self.named_parameters()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Copy ``state`` into the parameters in place; names and shapes must match."""
        params = dict(self.named_parameters())
        if set(state) != set(params):
            missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            raise KeyError(f"weights do not fit this network: missing {missing}, "
                           f"unexpected {unexpected}")
        for name, value in state.items():
            if np.shape(value) != params[name].shape:
                raise ValueError(f"{name}: shape {np.shape(value)} does not match "
                                 f"{params[name].shape}")
            np.copyto(params[name], value)

    def save(self, path: str | os.PathLike[str] | BinaryIO) -> None:
        """Write the parameters as an npz file (exactly at ``path``: no ".npz" appended)."""
        if hasattr(path, "write"):
            np.savez(path, **self.state_dict())
            return
        with open(path, "wb") as f:
            np.savez(f, **self.state_dict())

    def load(self, path: str | os.PathLike[str] | BinaryIO) -> None:
        with np.load(path, allow_pickle=False) as data:
            self.load_state_dict({name: data[name] for name in data.files})

    def __repr__(self) -> str:
        lines = [f"  ({i}) {layer!r}" for i, layer in enumerate(self.layers)]
        return "Sequential(\n" + "\n".join(lines) + f"\n)  # {self.num_parameters():,} parameters"


def plan_steps(layers: list[Layer]) -> list[Layer | Block]:
    """Group layers into blocks: Conv2D [+ ReLU | Sigmoid] [+ MaxPool2D] into a conv block,
    Linear [+ ReLU | Sigmoid] into a dense block; any other layer runs as itself."""
    steps: list[Layer | Block] = []
    i = 0
    while i < len(layers):
        layer, j = layers[i], i + 1
        activation = None
        if isinstance(layer, Conv2D | Linear) and j < len(layers) \
                and isinstance(layers[j], ACTIVATIONS):
            activation, j = layers[j], j + 1
        if isinstance(layer, Conv2D):
            pool = None
            if j < len(layers) and isinstance(layers[j], MaxPool2D):
                pool, j = layers[j], j + 1
            if isinstance(activation, ReLU) and pool is not None \
                    and fusable(layer, activation, pool):
                steps.append(ConvReLUPool(layer))
            else:
                steps.append(ConvBlock(layer, activation, pool))
        elif isinstance(layer, Linear):
            steps.append(DenseBlock(layer, activation))
        else:
            steps.append(layer)
        i = j
    return steps


def default_widths(in_channels: int, height: int, width: int) -> tuple[int, int, int]:
    """(conv1 channels, conv2 channels, hidden units) for an input size; see the module doc."""
    if in_channels >= 3 or min(height, width) >= 64:
        return 32, 64, 256
    return 16, 32, 128


def build_default_cnn(in_channels: int, image_size: int | tuple[int, int], num_classes: int,
                      rng: np.random.Generator | None = None, *, fuse: bool = True) -> Sequential:
    """The default network for (in_channels, image_size) inputs and ``num_classes`` outputs
    (architecture in the module docstring). ``image_size``: side length or (height, width)."""
    height, width = _pair(image_size, "image_size")
    if height < 4 or width < 4:
        raise ValueError(f"images must be at least 4x4 for two 2x2 poolings, got {height}x{width}")
    rng = rng if rng is not None else np.random.default_rng()
    c1, c2, hidden = default_widths(in_channels, height, width)
    features = c2 * (height // 4) * (width // 4)
    return Sequential(
        Conv2D(in_channels, c1, 3, padding=1, rng=rng), ReLU(), MaxPool2D(2),
        Conv2D(c1, c2, 3, padding=1, rng=rng), ReLU(), MaxPool2D(2),
        Flatten(), Linear(features, hidden, rng=rng), ReLU(), Linear(hidden, num_classes, rng=rng),
        fuse=fuse,
    )
