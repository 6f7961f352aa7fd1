"""The general fast path (worker/numpy_cnn/blocks.py): conv blocks of any kernel, stride,
padding and input shape, with ReLU/Sigmoid and max-pool fused in, and Linear + activation.
Float64 central differences and torch parity on randomised shapes, and the blocks inside
Sequential against the plain layers and against torch."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_numpy_layers import check_gradients

from labctl.worker.numpy_cnn import (
    Conv2D,
    Flatten,
    Linear,
    MaxPool2D,
    ReLU,
    Sequential,
    Sigmoid,
    softmax_cross_entropy,
)
from labctl.worker.numpy_cnn.blocks import ConvBlock, DenseBlock
from labctl.worker.numpy_cnn.fused import ConvReLUPool

ACTIVATIONS = {None: None, "relu": ReLU, "sigmoid": Sigmoid}
#: max-pool (kernel, stride) choices: none, 2x2, overlapping 3/2, 2 with stride 1
POOLS = [None, (2, 2), (3, 2), (2, 1)]


def conv_configs() -> list[dict]:
    """Every kernel size 1/3/5/7 with every stride 1-3; padding runs through 0-3, channels
    1, 3 and 4, batch 1-3, and each shape is non-square; activations and pools rotate."""
    rng = np.random.default_rng(2026)
    configs = []
    for i, (kernel, stride) in enumerate(itertools.product((1, 3, 5, 7), (1, 2, 3))):
        padding = (kernel + stride) % 4
        pool = POOLS[i % len(POOLS)]
        reach = pool[0] if pool else 1                   # conv output must hold a window
        least = (reach - 1) * stride + kernel - 2 * padding
        h = max(least, 1) + int(rng.integers(1, 5))
        w = h + int(rng.integers(1, 4))                  # never square
        configs.append(dict(kernel=kernel, stride=stride, padding=padding,
                            channels=(1, 3, 4)[i % 3], batch=(1, 2, 3)[i % 3], size=(h, w),
                            filters=2, activation=[None, "relu", "sigmoid"][i % 3], pool=pool))
    return configs


CONFIGS = conv_configs()

#: Rectangular kernels, strides and paddings: a row stride of 1 with a column stride of 2
#: (the input gradient's GEMMs then write grad_in's rows directly), 2 with 1, a kernel
#: narrower than its column stride (columns no tap reaches), and a pool after a (1, 3)
#: stride; each input width a whole multiple of the column stride or not.
RECT_CONFIGS = [
    dict(kernel=(3, 5), stride=(1, 2), padding=(1, 2), channels=3, batch=2, size=(7, 10),
         filters=2, activation="relu", pool=None),
    dict(kernel=(5, 3), stride=(2, 1), padding=(2, 0), channels=1, batch=1, size=(9, 6),
         filters=2, activation="sigmoid", pool=None),
    dict(kernel=(3, 1), stride=(3, 2), padding=(0, 0), channels=4, batch=3, size=(10, 7),
         filters=2, activation=None, pool=None),
    dict(kernel=(7, 3), stride=(1, 3), padding=(3, 1), channels=3, batch=2, size=(8, 9),
         filters=2, activation="sigmoid", pool=(2, 2)),
]


def _hw(value: int | tuple[int, int]) -> str:
    return f"{value[0]}x{value[1]}" if isinstance(value, tuple) else str(value)


def config_id(c: dict) -> str:
    pool = f"-pool{c['pool'][0]}s{c['pool'][1]}" if c["pool"] else ""
    return (f"k{_hw(c['kernel'])}s{_hw(c['stride'])}p{_hw(c['padding'])}-c{c['channels']}-"
            f"n{c['batch']}-{c['size'][0]}x{c['size'][1]}-{c['activation']}{pool}")


def test_configs_cover_the_issue_grid():
    assert {c["kernel"] for c in CONFIGS} == {1, 3, 5, 7}
    assert {c["stride"] for c in CONFIGS} == {1, 2, 3}
    assert {c["padding"] for c in CONFIGS} == {0, 1, 2, 3}
    assert {c["channels"] for c in CONFIGS} == {1, 3, 4}  # 4: the row-major im2col
    assert 1 in {c["batch"] for c in CONFIGS}
    assert all(c["size"][0] != c["size"][1] for c in CONFIGS)


def make_block(c: dict, seed: int = 0) -> tuple[ConvBlock, Conv2D]:
    rng = np.random.default_rng(seed)
    conv = Conv2D(c["channels"], c["filters"], c["kernel"], stride=c["stride"],
                  padding=c["padding"], rng=rng).astype(np.float64)
    conv.params["bias"][:] = rng.standard_normal(c["filters"]) * 0.3
    activation = ACTIVATIONS[c["activation"]]
    pool = MaxPool2D(*c["pool"]) if c["pool"] else None
    return ConvBlock(conv, activation() if activation else None, pool), conv


def torch_block(c: dict, x_nchw: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor) -> torch.Tensor:
    out = F.conv2d(x_nchw, weight, bias, stride=c["stride"], padding=c["padding"])
    if c["activation"] == "relu":
        out = F.relu(out)
    elif c["activation"] == "sigmoid":
        out = torch.sigmoid(out)
    if c["pool"]:
        out = F.max_pool2d(out, c["pool"][0], c["pool"][1])
    return out


def kink_margins(c: dict, conv: Conv2D, x_nhwc: np.ndarray) -> tuple[float, float]:
    """How far the conv output is from ReLU's kink, and the smallest lead of a max-pool
    window's winner over its runner-up: a 1e-6 nudge must cross neither. Exact ties are
    left out: only pixels of the zero padding, which no input reaches, tie exactly (they
    all hold the bias) and a nudge of the bias moves them together."""
    z = conv.forward(x_nhwc.transpose(0, 3, 1, 2))
    relu_margin = np.abs(z).min() if c["activation"] == "relu" else np.inf
    if not c["pool"]:
        return relu_margin, np.inf
    (pk, ps) = c["pool"]
    windows = np.lib.stride_tricks.sliding_window_view(z, (pk, pk), axis=(2, 3))[:, :, ::ps, ::ps]
    top = np.sort(windows.reshape(*windows.shape[:4], -1), axis=-1)
    leads = top[..., -1] - top[..., -2]
    return relu_margin, leads[leads > 0].min()


@pytest.mark.parametrize("threads", ["1", "3"])
@pytest.mark.parametrize("config", CONFIGS + RECT_CONFIGS, ids=config_id)
def test_conv_block_gradients_match_central_differences(monkeypatch, threads, config):
    monkeypatch.setenv("LABCTL_NUMPY_THREADS", threads)
    block, conv = make_block(config)
    h, w = config["size"]
    x = np.random.default_rng(1).standard_normal((config["batch"], h, w, config["channels"]))
    relu_margin, pool_margin = kink_margins(config, conv, x)
    assert relu_margin > 1e-4 and pool_margin > 1e-4  # else pick another seed
    conv.zero_grad()
    check_gradients(block.forward, block.backward, x, conv.params, conv.grads)


@pytest.mark.parametrize("config", CONFIGS + RECT_CONFIGS, ids=config_id)
def test_conv_block_matches_torch(monkeypatch, config):
    monkeypatch.setenv("LABCTL_NUMPY_THREADS", "2")
    block, conv = make_block(config, seed=5)
    h, w = config["size"]
    rng = np.random.default_rng(6)
    x = rng.standard_normal((config["batch"], config["channels"], h, w))
    out = block.forward(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    weights = rng.standard_normal(out.shape)
    conv.zero_grad()
    grad_in = block.backward(weights).transpose(0, 3, 1, 2)

    xt = torch.from_numpy(x).requires_grad_()
    wt = torch.from_numpy(conv.params["weight"].copy()).requires_grad_()
    bt = torch.from_numpy(conv.params["bias"].copy()).requires_grad_()
    expected = torch_block(config, xt, wt, bt)
    (expected * torch.from_numpy(weights.transpose(0, 3, 1, 2))).sum().backward()

    np.testing.assert_allclose(out.transpose(0, 3, 1, 2), expected.detach().numpy(),
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grad_in, xt.grad.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(conv.grads["weight"], wt.grad.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(conv.grads["bias"], bt.grad.numpy(), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("stride, padding, kernel", [(2, 0, 1), (3, 1, 1), (3, 0, 2)])
def test_input_pixels_no_kernel_tap_reaches_get_zero_gradient(stride, padding, kernel):
    """A kernel smaller than the stride skips input rows and columns: their gradient is 0."""
    config = dict(kernel=kernel, stride=stride, padding=padding, channels=3, batch=2,
                  size=(9, 7), filters=2, activation=None, pool=None)
    block, conv = make_block(config)
    x = np.random.default_rng(0).standard_normal((2, 9, 7, 3))
    out = block.forward(x)
    grad_in = block.backward(np.ones_like(out))
    reached = np.zeros((9, 7), bool)  # input pixels some output's kernel window covers
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            top, left = i * stride - padding, j * stride - padding
            reached[max(top, 0):max(top + kernel, 0), max(left, 0):max(left + kernel, 0)] = True
    assert not reached.all()
    assert (grad_in[:, ~reached] == 0).all() and (grad_in[:, reached] != 0).all()
    conv.zero_grad()
    check_gradients(block.forward, block.backward, x, conv.params, conv.grads)


@pytest.mark.parametrize("activation", [None, "relu", "sigmoid"])
def test_dense_block_gradients_and_torch_parity(activation):
    rng = np.random.default_rng(3)
    linear = Linear(7, 5, rng=rng).astype(np.float64)
    linear.params["bias"][:] = rng.standard_normal(5)
    act = ACTIVATIONS[activation]
    block = DenseBlock(linear, act() if act else None)
    x = rng.standard_normal((4, 7))
    assert np.abs(x @ linear.params["weight"].T + linear.params["bias"]).min() > 1e-3  # kink
    linear.zero_grad()
    check_gradients(block.forward, block.backward, x, linear.params, linear.grads)

    xt = torch.from_numpy(x)
    expected = F.linear(xt, torch.from_numpy(linear.params["weight"]),
                        torch.from_numpy(linear.params["bias"]))
    expected = {None: lambda t: t, "relu": F.relu, "sigmoid": torch.sigmoid}[activation](expected)
    np.testing.assert_allclose(block.forward(x), expected.numpy(), rtol=1e-12, atol=1e-14)


def lab_layers(rng: np.random.Generator, channels: int = 1) -> list:
    """The lab-style network of issue 10 on 1x13x11 inputs, plus an overlapping pool."""
    return [Conv2D(channels, 4, 5, padding=2, rng=rng), Sigmoid(),
            Conv2D(4, 6, 3, stride=2, padding=1, rng=rng), Sigmoid(),
            Conv2D(6, 6, 3, stride=2, padding=1, rng=rng), ReLU(), MaxPool2D(2, 1),
            Flatten(), Linear(6 * 3 * 2, 8, rng=rng), Sigmoid(), Linear(8, 3, rng=rng)]


def deep_layers(rng: np.random.Generator, channels: int = 3) -> list:
    return [Conv2D(channels, 4, 3, padding=1, rng=rng), ReLU(),
            Conv2D(4, 4, 3, stride=2, padding=1, rng=rng), ReLU(),
            Conv2D(4, 5, 3, padding=1, rng=rng), ReLU(),
            Conv2D(5, 5, 3, stride=2, padding=1, rng=rng), ReLU(), Flatten(),
            Linear(5 * 4 * 3, 3, rng=rng)]


def test_sequential_groups_layers_into_blocks():
    steps = Sequential(*lab_layers(np.random.default_rng(0))).steps
    assert [type(s).__name__ for s in steps] == [
        "ConvBlock", "ConvBlock", "ConvBlock", "Flatten", "DenseBlock", "DenseBlock"]
    assert [s.activation for s in steps if not isinstance(s, Flatten)] == [
        "sigmoid", "sigmoid", "relu", "sigmoid", None]
    assert steps[2].pool is not None and steps[0].pool is None
    # The default network's stride-1 conv -> ReLU -> 2x2 pool keeps its tuned block.
    rng = np.random.default_rng(0)
    steps = Sequential(Conv2D(1, 2, 3, padding=1, rng=rng), ReLU(), MaxPool2D(2),
                       Conv2D(2, 2, 3, stride=2, rng=rng), ReLU(), MaxPool2D(2)).steps
    assert [type(s) for s in steps] == [ConvReLUPool, ConvBlock]
    plain = Sequential(*lab_layers(rng), fuse=False)
    assert plain.steps == plain.layers


@pytest.mark.parametrize("build, shape", [(lab_layers, (1, 13, 11)), (deep_layers, (3, 14, 11))])
@pytest.mark.parametrize("batch", [1, 5])
def test_networks_on_the_fast_path_match_the_plain_layers_and_torch(build, shape, batch):
    fast = Sequential(*build(np.random.default_rng(0), shape[0]))
    plain = Sequential(*build(np.random.default_rng(0), shape[0]), fuse=False)
    for model in (fast, plain):
        for layer in model.layers:
            layer.astype(np.float64)
    x = np.random.default_rng(1).standard_normal((batch, *shape))
    labels = np.arange(batch) % 3
    results = []
    for model in (fast, plain):
        model.zero_grad()
        loss, grad = softmax_cross_entropy(model.forward(x), labels)
        results.append((loss, model.backward(grad), model))
    (loss_f, dx_f, _), (loss_p, dx_p, _) = results
    assert loss_f == pytest.approx(loss_p, rel=1e-12)
    np.testing.assert_allclose(dx_f, dx_p, rtol=1e-9, atol=1e-14)
    for lf, lp in zip(fast.layers, plain.layers, strict=True):
        for key in lf.grads:
            np.testing.assert_allclose(lf.grads[key], lp.grads[key], rtol=1e-9, atol=1e-14)

    from labctl.bench.numpy_vs_torch import torch_twin  # the benchmark's own torch copy

    theirs = torch_twin(fast).double()
    xt = torch.from_numpy(x).requires_grad_()
    loss_t = F.cross_entropy(theirs(xt), torch.from_numpy(labels))
    loss_t.backward()
    assert loss_f == pytest.approx(loss_t.item(), rel=1e-10)
    np.testing.assert_allclose(dx_f, xt.grad.numpy(), rtol=1e-8, atol=1e-13)
    named = dict(theirs.named_parameters())
    for i, layer in enumerate(fast.layers):
        for key, grad in layer.grads.items():
            np.testing.assert_allclose(grad, named[f"{i}.{key}"].grad.numpy(), rtol=1e-8,
                                       atol=1e-13, err_msg=f"{i}.{key}")


def test_an_evaluation_forward_leaves_the_pending_backward_alone():
    model = Sequential(*lab_layers(np.random.default_rng(0)))
    x = np.random.default_rng(1).standard_normal((4, 1, 13, 11)).astype(np.float32)
    other = np.random.default_rng(2).standard_normal((3, 1, 13, 11)).astype(np.float32)
    _, grad = softmax_cross_entropy(model.forward(x), np.array([0, 1, 2, 0]))
    model.backward(grad)
    expected = [layer.grads[k].copy() for layer in model.layers for k in layer.grads]
    model.zero_grad()
    model.forward(x)
    model.forward(other, train=False)
    model.backward(grad)
    for got, want in zip((layer.grads[k] for layer in model.layers for k in layer.grads),
                         expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_sigmoid_in_a_block_saturates_without_warnings():
    rng = np.random.default_rng(0)
    block = DenseBlock(Linear(2, 2, rng=rng), Sigmoid())
    x = np.array([[1e4, -1e4], [-1e4, 1e4]], np.float32)
    with np.errstate(all="raise"):
        out = block.forward(x)
        block.backward(np.ones_like(out))
    assert np.isfinite(out).all() and ((out >= 0) & (out <= 1)).all()
