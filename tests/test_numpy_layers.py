"""NumPy layers and loss: central-difference gradient checks (float64) and parity with
torch.nn.functional, forward and backward, on randomised shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from worker.numpy_cnn.layers import Conv2D, Flatten, Linear, MaxPool2D, ReLU, Sigmoid
from worker.numpy_cnn.losses import softmax_cross_entropy


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


def check_layer_gradients(layer, x: np.ndarray, seed: int = 0) -> None:
    """Analytic input and parameter gradients of sum(forward(x) * R) vs central differences."""
    layer.astype(np.float64)
    layer.zero_grad()
    weights = np.random.default_rng(seed).standard_normal(layer.forward(x).shape)

    def loss() -> float:
        return float((layer.forward(x) * weights).sum())

    loss()
    grad_in = layer.backward(weights)
    np.testing.assert_allclose(grad_in, numeric_gradient(loss, x), rtol=1e-6, atol=1e-8)
    for name, param in layer.params.items():
        np.testing.assert_allclose(layer.grads[name], numeric_gradient(loss, param),
                                   rtol=1e-6, atol=1e-8, err_msg=name)


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
    if h + 2 * padding < kernel or w + 2 * padding < kernel:
        return  # no output position: torch refuses such shapes too
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
    if kernel > min(h, w):
        return
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


@pytest.mark.parametrize("n, d_in, d_out", [(1, 1, 1), (5, 17, 3), (64, 1568, 128)])
def test_linear_matches_torch(n, d_in, d_out):
    rng = np.random.default_rng(n)
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


@pytest.mark.parametrize("layer, fn", [(ReLU(), torch.relu), (Sigmoid(), torch.sigmoid)],
                         ids=["relu", "sigmoid"])
def test_activations_match_torch(layer, fn):
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


@pytest.mark.parametrize("n, k", [(1, 2), (7, 10), (32, 196)])
def test_cross_entropy_matches_torch(n, k):
    rng = np.random.default_rng(k)
    logits = (rng.standard_normal((n, k)) * 5).astype(np.float32)
    labels = rng.integers(0, k, n)
    loss, grad = softmax_cross_entropy(logits, labels)
    logits_t = torch.tensor(logits, requires_grad=True)
    expected = F.cross_entropy(logits_t, torch.from_numpy(labels))
    expected.backward()
    assert isinstance(loss, float) and grad.dtype == np.float32
    assert loss == pytest.approx(expected.item(), rel=1e-5)
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
