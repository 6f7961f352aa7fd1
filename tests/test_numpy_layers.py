"""NumPy layers and loss: central-difference gradient checks (float64) and parity with
torch.nn.functional, forward and backward, on randomised shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from labctl.worker.numpy_cnn.fused import ConvReLUPool
from labctl.worker.numpy_cnn.layers import Conv2D, Flatten, Linear, MaxPool2D, ReLU, Sigmoid
from labctl.worker.numpy_cnn.losses import softmax_cross_entropy


def distinct_values(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float64 values at least 0.05 apart, so a 1e-6 nudge never reorders a max-pool window
    nor crosses zero for ReLU."""
    values = (rng.permutation(int(np.prod(shape))) - np.prod(shape) / 2 + 0.5) * 0.05
    return values.reshape(shape)


def numeric_gradient(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar f() with respect to every entry of x (in place)."""
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        up = f()
        flat[i] = old - eps
        down = f()
        flat[i] = old
        gflat[i] = (up - down) / (2 * eps)
    return grad


def check_gradients(forward, backward, x: np.ndarray, params: dict, grads: dict,
                    seed: int = 0) -> None:
    """Analytic input and parameter gradients of sum(forward(x) * R) vs central differences.
    ``grads`` must be zero on entry; ``backward`` adds into it."""
    weights = np.random.default_rng(seed).standard_normal(forward(x).shape)

    def loss() -> float:
        return float((forward(x) * weights).sum())

    loss()
    grad_in = backward(weights)
    np.testing.assert_allclose(grad_in, numeric_gradient(loss, x), rtol=1e-6, atol=1e-8)
    for name, param in params.items():
        np.testing.assert_allclose(grads[name], numeric_gradient(loss, param),
                                   rtol=1e-6, atol=1e-8, err_msg=name)


def check_layer_gradients(layer, x: np.ndarray, seed: int = 0) -> None:
    layer.astype(np.float64)
    layer.zero_grad()
    check_gradients(layer.forward, layer.backward, x, layer.params, layer.grads, seed)


@pytest.mark.parametrize("kernel, stride, padding, shape", [
    (3, 1, 1, (2, 3, 6, 5)),
    (3, 2, 0, (1, 2, 7, 6)),
    (1, 1, 0, (2, 3, 4, 4)),
    (5, 2, 2, (1, 2, 6, 7)),
    ((2, 3), (2, 1), (1, 0), (2, 2, 5, 6)),
])
def test_conv2d_gradients_match_central_differences(kernel, stride, padding, shape):
    rng = np.random.default_rng(1)
    layer = Conv2D(shape[1], 3, kernel, stride, padding, rng=rng)
    layer.params["bias"][:] = rng.standard_normal(3)
    check_layer_gradients(layer, rng.standard_normal(shape))


def test_linear_gradients_match_central_differences():
    rng = np.random.default_rng(2)
    layer = Linear(7, 4, rng=rng)
    layer.params["bias"][:] = rng.standard_normal(4)
    check_layer_gradients(layer, rng.standard_normal((3, 7)))


@pytest.mark.parametrize("kernel, stride", [(2, None), (3, 2), (2, 1), ((2, 3), (1, 2))])
def test_maxpool_gradients_match_central_differences(kernel, stride):
    x = distinct_values(np.random.default_rng(3), (2, 3, 7, 6))
    check_layer_gradients(MaxPool2D(kernel, stride), x)


@pytest.mark.parametrize("layer", [ReLU(), Sigmoid(), Flatten()], ids=type)
def test_parameterless_layer_gradients_match_central_differences(layer):
    check_layer_gradients(layer, distinct_values(np.random.default_rng(4), (2, 3, 4, 3)))


def pool_windows(conv_out: np.ndarray) -> np.ndarray:
    """(N, F, H, W) -> (N, F, H // 2, W // 2, 4): the values of each 2x2 pooling window."""
    n, f, h, w = conv_out.shape
    z = conv_out[:, :, :h // 2 * 2, :w // 2 * 2].reshape(n, f, h // 2, 2, w // 2, 2)
    return z.transpose(0, 1, 2, 4, 3, 5).reshape(n, f, h // 2, w // 2, 4)


@pytest.mark.parametrize("threads", ["1", "3"])
@pytest.mark.parametrize("c, f, kernel, padding, nhw", [
    (1, 3, 3, 1, (3, 7, 6)),    # one channel (channel-major im2col), odd non-square
    (2, 3, 3, 1, (3, 6, 9)),    # row-major im2col
    (3, 2, 5, 2, (2, 8, 7)),    # kernel 5, padding 2
    (2, 2, 1, 0, (3, 5, 4)),    # kernel 1
    (1, 2, 3, 0, (2, 8, 6)),    # no padding
])
def test_fused_conv_relu_pool_gradients_match_central_differences(
        monkeypatch, threads, c, f, kernel, padding, nhw):
    monkeypatch.setenv("LABCTL_NUMPY_THREADS", threads)  # 3 threads: one chunk per image
    rng = np.random.default_rng(8)
    conv = Conv2D(c, f, kernel, padding=padding, rng=rng).astype(np.float64)
    conv.params["bias"][:] = rng.standard_normal(f) * 0.5 - 1  # some windows < 0
    block = ConvReLUPool(conv)
    x = rng.standard_normal((nhw[0], nhw[1], nhw[2], c))  # NHWC, float64
    # A 1e-6 nudge must cross no kink: every window's winner leads by a margin, and no
    # pooled value sits at ReLU's zero. Both sides of ReLU occur, so both are checked.
    top = np.sort(pool_windows(conv.forward(x.transpose(0, 3, 1, 2))), axis=-1)
    assert (top[..., 3] - top[..., 2]).min() > 1e-4 and np.abs(top[..., 3]).min() > 1e-4
    assert (top[..., 3] > 0).any() and (top[..., 3] < 0).any()
    conv.zero_grad()
    check_gradients(block.forward, block.backward, x, conv.params, conv.grads)


@pytest.mark.parametrize("n, k, scale", [(1, 1, 1.0), (1, 2, 1.0), (4, 5, 3.0), (7, 10, 0.1)])
def test_cross_entropy_gradient_matches_central_differences(n, k, scale):
    rng = np.random.default_rng(k)
    logits = rng.standard_normal((n, k)) * scale
    labels = rng.integers(0, k, n)
    loss, grad = softmax_cross_entropy(logits, labels)
    assert grad.dtype == np.float64
    numeric = numeric_gradient(lambda: softmax_cross_entropy(logits, labels)[0], logits)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- torch parity
def torch_grads(fn, *arrays: np.ndarray, grad_out: np.ndarray):
    """Output of fn(*tensors) and the gradients of sum(out * grad_out) w.r.t. each input."""
    tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
    out = fn(*tensors)
    out.backward(torch.from_numpy(grad_out))
    return out.detach().numpy(), [t.grad.numpy() for t in tensors]


def close(actual, expected, scale=1.0):
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * scale)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 4), f=st.integers(1, 5),
       h=st.integers(1, 11), w=st.integers(1, 11), kernel=st.sampled_from([1, 2, 3, 5]),
       stride=st.sampled_from([1, 2, 3]), padding=st.integers(0, 2), seed=st.integers(0, 99))
@example(n=1, c=3, f=4, h=9, w=6, kernel=5, stride=2, padding=2, seed=0)
@example(n=1, c=2, f=3, h=5, w=8, kernel=1, stride=1, padding=0, seed=1)
@example(n=2, c=3, f=5, h=7, w=10, kernel=3, stride=2, padding=1, seed=2)
def test_conv2d_matches_torch(n, c, f, h, w, kernel, stride, padding, seed):
    assume(h + 2 * padding >= kernel and w + 2 * padding >= kernel)  # torch refuses others
    rng = np.random.default_rng(seed)
    layer = Conv2D(c, f, kernel, stride, padding, rng=rng)
    layer.params["bias"][:] = rng.standard_normal(f)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    out = layer.forward(x)
    grad_out = rng.standard_normal(out.shape).astype(np.float32)
    expected, (gx, gw, gb) = torch_grads(
        lambda a, wt, b: F.conv2d(a, wt, b, stride=stride, padding=padding),
        x, layer.params["weight"], layer.params["bias"], grad_out=grad_out)
    assert out.dtype == np.float32 and out.shape == expected.shape
    close(out, expected)
    close(layer.backward(grad_out), gx)
    close(layer.grads["weight"], gw, scale=n * h * w)
    close(layer.grads["bias"], gb, scale=n * h * w)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 3), h=st.integers(2, 10), w=st.integers(2, 10),
       kernel=st.sampled_from([1, 2, 3]), stride=st.sampled_from([None, 1, 2, 3]),
       ties=st.booleans(), seed=st.integers(0, 99))
@example(n=1, c=2, h=7, w=4, kernel=2, stride=None, ties=True, seed=0)
@example(n=2, c=1, h=9, w=8, kernel=3, stride=2, ties=False, seed=1)
def test_maxpool_matches_torch_including_ties(n, c, h, w, kernel, stride, ties, seed):
    assume(kernel <= min(h, w))
    rng = np.random.default_rng(seed)
    # Small integers make many windows tie; torch sends the gradient to the first maximum.
    x = (rng.integers(0, 3, (n, c, h, w)) if ties else rng.standard_normal((n, c, h, w)))
    x = x.astype(np.float32)
    layer = MaxPool2D(kernel, stride)
    out = layer.forward(x)
    grad_out = rng.standard_normal(out.shape).astype(np.float32)
    expected, (gx,) = torch_grads(lambda a: F.max_pool2d(a, kernel, stride), x,
                                  grad_out=grad_out)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_allclose(layer.backward(grad_out), gx, rtol=1e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 4), c=st.integers(1, 3), f=st.integers(1, 4), h=st.integers(2, 11),
       w=st.integers(2, 11), kernel=st.sampled_from([1, 3, 5]), padding=st.integers(0, 2),
       threads=st.sampled_from(["1", "3"]), seed=st.integers(0, 99))
@example(n=2, c=1, f=3, h=9, w=6, kernel=3, padding=1, threads="3", seed=0)
@example(n=3, c=3, f=4, h=8, w=11, kernel=5, padding=2, threads="3", seed=1)
@example(n=1, c=2, f=2, h=2, w=3, kernel=1, padding=0, threads="1", seed=2)
def test_fused_conv_relu_pool_matches_torch(n, c, f, h, w, kernel, padding, threads, seed):
    """The training fast path (NHWC, chunked over threads) against conv -> relu -> pool."""
    assume(padding < kernel)  # what fusable() admits
    assume(h + 2 * padding - kernel + 1 >= 2 and w + 2 * padding - kernel + 1 >= 2)
    rng = np.random.default_rng(seed)
    conv = Conv2D(c, f, kernel, padding=padding, rng=rng)
    conv.params["bias"][:] = rng.standard_normal(f)
    block = ConvReLUPool(conv)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LABCTL_NUMPY_THREADS", threads)
        out = block.forward(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
        grad_out = rng.standard_normal(out.shape).astype(np.float32)
        grad_in = block.backward(grad_out)
    expected, (gx, gw, gb) = torch_grads(
        lambda a, wt, b: F.max_pool2d(F.relu(F.conv2d(a, wt, b, padding=padding)), 2),
        x, conv.params["weight"], conv.params["bias"],
        grad_out=np.ascontiguousarray(grad_out.transpose(0, 3, 1, 2)))
    assert out.dtype == np.float32 and grad_in.dtype == np.float32
    close(out.transpose(0, 3, 1, 2), expected)
    close(grad_in.transpose(0, 3, 1, 2), gx)
    close(conv.grads["weight"], gw, scale=n * h * w)
    close(conv.grads["bias"], gb, scale=n * h * w)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), d_in=st.integers(1, 40), d_out=st.integers(1, 20),
       seed=st.integers(0, 99))
@example(n=1, d_in=1, d_out=1, seed=0)
@example(n=5, d_in=17, d_out=3, seed=1)
@example(n=64, d_in=1568, d_out=128, seed=2)  # the default CNN's first Linear
def test_linear_matches_torch(n, d_in, d_out, seed):
    rng = np.random.default_rng(seed)
    layer = Linear(d_in, d_out, rng=rng)
    layer.params["bias"][:] = rng.standard_normal(d_out)
    x = rng.standard_normal((n, d_in)).astype(np.float32)
    grad_out = rng.standard_normal((n, d_out)).astype(np.float32)
    expected, (gx, gw, gb) = torch_grads(F.linear, x, layer.params["weight"],
                                         layer.params["bias"], grad_out=grad_out)
    close(layer.forward(x), expected, scale=d_in)
    close(layer.backward(grad_out), gx, scale=d_out)
    close(layer.grads["weight"], gw, scale=n)
    close(layer.grads["bias"], gb, scale=n)


ACTIVATIONS = {"relu": (ReLU, torch.relu), "sigmoid": (Sigmoid, torch.sigmoid)}


@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(sorted(ACTIVATIONS)),
       shape=st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple),
       scale=st.sampled_from([0.1, 1.0, 10.0, 100.0]), seed=st.integers(0, 99))
@example(name="sigmoid", shape=(2, 3, 4, 5), scale=30.0, seed=0)
@example(name="relu", shape=(64, 16, 2, 2), scale=1.0, seed=1)
def test_activations_match_torch_on_random_shapes(name, shape, scale, seed):
    layer_type, fn = ACTIVATIONS[name]
    layer = layer_type()
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    grad_out = rng.standard_normal(shape).astype(np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        out = layer.forward(x)
        grad_in = layer.backward(grad_out)
    expected, (gx,) = torch_grads(fn, x, grad_out=grad_out)
    assert out.dtype == np.float32 and out.shape == shape
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
    # Near saturation s * (1 - s) keeps only float32's absolute precision (~6e-8 * |grad|),
    # in torch as here (both ~1e-7 from the float64 value), hence the absolute tolerance.
    np.testing.assert_allclose(grad_in, gx, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer, fn", [(ReLU(), torch.relu), (Sigmoid(), torch.sigmoid)],
                         ids=["relu", "sigmoid"])
def test_activations_match_torch_on_extreme_inputs(layer, fn):
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.standard_normal(50), [0.0, -1000.0, 1000.0, 88.0, -104.0]])
    x = x.astype(np.float32).reshape(1, 1, 5, 11)
    grad_out = rng.standard_normal(x.shape).astype(np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # huge inputs: no warnings
        out = layer.forward(x)
        grad_in = layer.backward(grad_out)
    expected, (gx,) = torch_grads(fn, x, grad_out=grad_out)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grad_in, gx, rtol=1e-5, atol=1e-7)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 16), k=st.integers(1, 30), scale=st.sampled_from([0.1, 1.0, 5.0, 50.0]),
       seed=st.integers(0, 99))
@example(n=1, k=2, scale=5.0, seed=0)
@example(n=7, k=10, scale=5.0, seed=1)
@example(n=32, k=196, scale=5.0, seed=2)  # Stanford Cars' 196 classes
def test_cross_entropy_matches_torch(n, k, scale, seed):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((n, k)) * scale).astype(np.float32)
    labels = rng.integers(0, k, n)
    loss, grad = softmax_cross_entropy(logits, labels)
    logits_t = torch.tensor(logits, requires_grad=True)
    expected = F.cross_entropy(logits_t, torch.from_numpy(labels))
    expected.backward()
    assert isinstance(loss, float) and grad.dtype == np.float32
    assert loss == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(grad, logits_t.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1e30, -1e30, 0.0], [1e38, 1e38, -1e38]], np.float32)
    labels = np.array([0, 2])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss, grad = softmax_cross_entropy(logits, labels)
    # Row 1 is certain and right (loss 0); row 2 puts ~0 probability on its label.
    assert loss == pytest.approx((0.0 + 2e38) / 2, rel=1e-6)
    np.testing.assert_allclose(grad, [[0, 0, 0], [0.25, 0.25, -0.5]], atol=1e-7)


def test_cross_entropy_reports_non_finite_logits_as_a_non_finite_loss():
    loss, _ = softmax_cross_entropy(np.array([[np.nan, 1.0]], np.float32), np.array([1]))
    assert not np.isfinite(loss)


# ----------------------------------------------------------------------------- protocol
def test_parameters_have_torch_shapes_and_torch_weights_copy_in():
    conv, linear = Conv2D(3, 8, 5, padding=2), Linear(12, 4)
    assert conv.params["weight"].shape == (8, 3, 5, 5) and conv.params["bias"].shape == (8,)
    assert linear.params["weight"].shape == (4, 12) and linear.params["bias"].shape == (4,)
    reference = torch.nn.Conv2d(3, 8, 5, padding=2)
    for name, value in reference.state_dict().items():
        conv.params[name][...] = value.numpy()
    x = np.random.default_rng(6).standard_normal((2, 3, 9, 9)).astype(np.float32)
    close(conv.forward(x), reference(torch.from_numpy(x)).detach().numpy())
    for layer in (conv, linear):
        for name in ("weight", "bias"):
            assert layer.params[name].dtype == np.float32
            assert layer.grads[name].shape == layer.params[name].shape


def test_gradients_accumulate_until_zero_grad():
    rng = np.random.default_rng(7)
    layer = Conv2D(2, 3, 3, padding=1, rng=rng)
    x = rng.standard_normal((2, 2, 5, 5)).astype(np.float32)
    grad_out = np.ones((2, 3, 5, 5), np.float32)
    layer.forward(x)
    layer.backward(grad_out)
    once = {k: v.copy() for k, v in layer.grads.items()}
    layer.forward(x)
    layer.backward(grad_out)
    for name in once:
        np.testing.assert_allclose(layer.grads[name], 2 * once[name], rtol=1e-6)
    layer.zero_grad()
    assert all(not g.any() for g in layer.grads.values())


def test_backward_before_forward_is_an_error():
    with pytest.raises(RuntimeError, match="before forward"):
        Linear(2, 2).backward(np.ones((1, 2), np.float32))


def test_he_initialisation_is_seeded_and_scaled():
    a = Conv2D(16, 32, 3, rng=np.random.default_rng(0)).params["weight"]
    b = Conv2D(16, 32, 3, rng=np.random.default_rng(0)).params["weight"]
    np.testing.assert_array_equal(a, b)
    assert a.std() == pytest.approx(np.sqrt(2 / (16 * 9)), rel=0.05)
