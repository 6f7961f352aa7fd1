"""Adam and AdaMax in NumPy against torch.optim.Adam / torch.optim.Adamax, and their state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labctl.worker.numpy_cnn.layers import Conv2D, Layer, Linear, ReLU
from labctl.worker.numpy_cnn.optim import SLICE, Adam, AdaMax, Optimizer

TORCH = {Adam: torch.optim.Adam, AdaMax: torch.optim.Adamax}


def make_layers(dtype=np.float32, big: bool = False) -> list[Layer]:
    """A conv, a parameterless layer (it still takes an index) and a linear layer; ``big``
    makes the linear layer span many optimizer slices (the threaded path)."""
    rng = np.random.default_rng(0)
    linear = Linear(64, 4 * SLICE // 64 + 7, rng=rng) if big else Linear(6, 3, rng=rng)
    layers = [Conv2D(2, 3, 3, rng=rng), ReLU(), linear]
    for layer in layers:
        layer.astype(dtype)
        if "bias" in layer.params:
            layer.params["bias"][:] = rng.standard_normal(layer.params["bias"].shape)
    return layers


def gradient_sequence(layers: list[Layer], steps: int,
                      seed: int = 1) -> list[dict[str, np.ndarray]]:
    """Per step, a gradient for every parameter; step 1's are all zero."""
    rng = np.random.default_rng(seed)
    sequence = []
    for step in range(steps):
        grads = {}
        for i, layer in enumerate(layers):
            for key, value in layer.params.items():
                g = rng.standard_normal(value.shape) * (10.0 ** rng.integers(-3, 2))
                grads[f"{i}.{key}"] = np.zeros_like(value) if step == 0 else g.astype(value.dtype)
        sequence.append(grads)
    return sequence


def run_numpy(optimizer: Optimizer, layers, sequence) -> None:
    for grads in sequence:
        optimizer.zero_grad()
        for i, layer in enumerate(layers):
            for key in layer.params:
                layer.grads[key] += grads[f"{i}.{key}"]
        optimizer.step()


def run_torch(cls, layers, sequence, **options) -> dict[str, np.ndarray]:
    params = {f"{i}.{k}": torch.tensor(v.copy()) for i, layer in enumerate(layers)
              for k, v in layer.params.items()}
    optimizer = TORCH[cls](list(params.values()), **options)
    for grads in sequence:
        for name, p in params.items():
            p.grad = torch.from_numpy(grads[name].copy())
        optimizer.step()
    return {name: p.numpy() for name, p in params.items()}


@pytest.mark.parametrize("cls", [Adam, AdaMax])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 2e-6)])
def test_matches_torch_over_several_steps(cls, weight_decay, dtype, rtol):
    options = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    layers = make_layers(dtype)
    sequence = gradient_sequence(layers, steps=7)
    expected = run_torch(cls, layers, sequence, **options)
    optimizer = cls(layers, **options)
    run_numpy(optimizer, layers, sequence)
    assert optimizer.step_count == 7
    for i, layer in enumerate(layers):
        for key, value in layer.params.items():
            assert value.dtype == dtype
            np.testing.assert_allclose(value, expected[f"{i}.{key}"], rtol=rtol, atol=rtol * 1e-2,
                                       err_msg=f"{i}.{key}")


@pytest.mark.parametrize("cls", [Adam, AdaMax])
def test_matches_torch_on_parameters_split_over_threads(cls):
    layers = make_layers(np.float32, big=True)
    sequence = gradient_sequence(layers, steps=5)
    expected = run_torch(cls, layers, sequence, lr=3e-3, weight_decay=0.01)
    run_numpy(cls(layers, lr=3e-3, weight_decay=0.01), layers, sequence)
    np.testing.assert_allclose(layers[2].params["weight"], expected["2.weight"], rtol=2e-6,
                               atol=1e-8)


def test_defaults_follow_kingma_and_ba():
    layers = make_layers()
    assert Adam(layers).lr == 1e-3 and AdaMax(layers).lr == 2e-3
    assert AdaMax(layers).betas == (0.9, 0.999) and AdaMax(layers).eps == 1e-8


def test_adamax_is_a_sibling_of_adam_sharing_the_base():
    assert issubclass(AdaMax, Optimizer) and issubclass(Adam, Optimizer)
    assert not issubclass(AdaMax, Adam) and not issubclass(Adam, AdaMax)
    assert "step" not in vars(AdaMax) and "zero_grad" not in vars(Adam)


def test_adamax_infinity_norm_includes_eps():
    """u = max(beta2 * u, |g| + eps): a zero gradient gives u = eps and no movement."""
    layer = Linear(2, 1)
    before = layer.params["weight"].copy()
    optimizer = AdaMax([layer], eps=1e-3)
    optimizer.step()
    np.testing.assert_array_equal(layer.params["weight"], before)
    np.testing.assert_allclose(optimizer.state["0.weight"]["exp_inf"], 1e-3)


def test_zero_grad_and_gradients_left_untouched_by_weight_decay():
    layers = make_layers()
    for layer in layers:
        for g in layer.grads.values():
            g[...] = 1
    optimizer = Adam(layers, weight_decay=0.5)
    optimizer.step()
    assert all((g == 1).all() for layer in layers for g in layer.grads.values())
    optimizer.zero_grad()
    assert not any(g.any() for layer in layers for g in layer.grads.values())


def test_state_is_keyed_by_layer_index_and_parameter():
    optimizer = AdaMax(make_layers())
    optimizer.step()
    assert sorted(optimizer.state) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    state = optimizer.state_dict()
    assert set(state) == {"step", *(f"{n}/{b}" for n in optimizer.state
                                    for b in ("exp_avg", "exp_inf"))}
    assert all(isinstance(v, np.ndarray) for v in state.values())


@pytest.mark.parametrize("cls", [Adam, AdaMax])
def test_state_dict_round_trip_resumes_exactly(cls, tmp_path):
    sequence = gradient_sequence(make_layers(), steps=6)
    straight = make_layers()
    run_numpy(cls(straight, weight_decay=0.01), straight, sequence)

    layers = make_layers()
    first = cls(layers, weight_decay=0.01)
    run_numpy(first, layers, sequence[:3])
    np.savez(tmp_path / "optim.npz", **first.state_dict())
    resumed = cls(layers, weight_decay=0.01)
    with np.load(tmp_path / "optim.npz") as data:
        resumed.load_state_dict(dict(data))
    assert resumed.step_count == 3
    run_numpy(resumed, layers, sequence[3:])
    for a, b in zip(straight, layers, strict=True):
        for key in a.params:
            np.testing.assert_array_equal(a.params[key], b.params[key])


def test_load_state_dict_rejects_state_of_another_network():
    optimizer = AdaMax(make_layers())
    optimizer.step()
    state = optimizer.state_dict()
    with pytest.raises(ValueError, match="shape"):
        AdaMax([Conv2D(2, 5, 3), ReLU(), Linear(6, 3)]).load_state_dict(state)
    with pytest.raises(KeyError):
        AdaMax([Conv2D(2, 3, 3)]).load_state_dict(state)  # no "2.weight" here
