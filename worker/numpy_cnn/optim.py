"""Adam and AdaMax (Kingma & Ba, 2015) in NumPy, numerically the same as torch.optim.

Designed like tinygrad's optimizers: :class:`Optimizer` owns the parameters, the step count,
the per-parameter state, ``zero_grad`` and ``step``; each algorithm only implements
``_step`` on one slice of one parameter. AdaMax is a sibling of Adam, not a copy.

Both follow torch's single-tensor code path operation by operation:

- weight decay is coupled L2, ``g = g + weight_decay * p`` (not AdamW's decoupled decay);
- the first moment is ``m = m + (1 - beta1) * (g - m)`` (torch's ``lerp``);
- Adam: ``v = beta2 * v + (1 - beta2) * g * g``,
  ``p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)``;
- AdaMax: ``u = max(beta2 * u, |g| + eps)``, ``p -= lr / (1 - beta1^t) * m / u``.

Results match torch to float rounding (torch fuses some multiply-adds); the tests compare
them over several steps, with weight decay and an all-zero first gradient.

State is keyed by parameter name, ``"<layer index>.<param>"`` (``"0.weight"``), as in a torch
``nn.Sequential``; :meth:`Optimizer.state_dict` is a flat dict of plain arrays, ready for
``np.savez``. Updates run in place on ``layer.params`` in cache-sized slices spread over
threads: a parameter update touches every weight about ten times, and doing that slice by
slice keeps the traffic in cache instead of streaming whole arrays through memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from labctl.worker.numpy_cnn.layers import Layer
from labctl.worker.numpy_cnn.parallel import num_threads, parallel_map, split_evenly

#: Elements per slice: the five arrays an update touches (256 KiB each) stay in L2/L3 cache,
#: and the per-call overhead of ~10 ufuncs is amortised (measured: 16K elements cost 10% more).
SLICE = 65536
#: Below this many parameters, threads cost more than they save.
MIN_PARALLEL = 2 * SLICE


class Optimizer:
    """Base class: applies ``_step`` to every (parameter, gradient) of ``layers``."""

    #: Names of the per-parameter state buffers (zero-initialised, shaped like the parameter).
    buffers: tuple[str, ...] = ()

    def __init__(self, layers: Iterable[Layer], lr: float, weight_decay: float = 0.0) -> None:
        if lr < 0 or weight_decay < 0:
            raise ValueError("lr and weight_decay must be >= 0")
        self.layers = list(layers)
        self.lr = lr
        self.weight_decay = weight_decay
        self.step_count = 0
        self.state: dict[str, dict[str, np.ndarray]] = {}

    def named_parameters(self) -> Iterator[tuple[str, Layer, str]]:
        """(state name, layer, key in layer.params), e.g. ("3.weight", conv, "weight")."""
        for index, layer in enumerate(self.layers):
            for key in layer.params:
                yield f"{index}.{key}", layer, key

    def zero_grad(self) -> None:
        for layer in self.layers:
            layer.zero_grad()

    def step(self) -> None:
        """One update of every parameter from its accumulated gradient."""
        self.step_count += 1
        pieces = []
        for name, layer, key in self.named_parameters():
            param = layer.params[key]
            if not param.flags.c_contiguous:  # reshape(-1) below must be a view, not a copy
                param = layer.params[key] = np.ascontiguousarray(param)
            state = self.state.get(name)
            if state is None:
                state = self.state[name] = {b: np.zeros_like(param) for b in self.buffers}
            flat = (param.reshape(-1), layer.grads[key].reshape(-1),
                    {b: s.reshape(-1) for b, s in state.items()})
            for start in range(0, param.size, SLICE):
                pieces.append((flat, slice(start, start + SLICE)))
        total = sum(min(SLICE, piece[0][0].size - piece[1].start) for piece in pieces)
        threads = num_threads() if total >= MIN_PARALLEL else 1
        groups = [pieces[part] for part in split_evenly(len(pieces), threads)]
        parallel_map(self._update_pieces, groups)

    def _update_pieces(self, pieces: list) -> None:
        for (param, grad, state), part in pieces:
            p, g = param[part], grad[part]
            if self.weight_decay:
                g = g + self.weight_decay * p  # a new array: the layer's gradient stays as is
            self._step(p, g, {b: s[part] for b, s in state.items()}, self.step_count)

    def _step(self, param: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray],
              step: int) -> None:
        """Update ``param`` (a 1-D view) in place from ``grad``; ``step`` counts from 1."""
        raise NotImplementedError

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, np.ndarray]:
        """``{"step": int64 scalar, "<name>/<buffer>": array}``: plain arrays for npz."""
        out = {"step": np.array(self.step_count, np.int64)}
        for name, state in self.state.items():
            for buffer, value in state.items():
                out[f"{name}/{buffer}"] = value.copy()
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`state_dict` returned; names and shapes must match."""
        params = {name: layer.params[key] for name, layer, key in self.named_parameters()}
        restored: dict[str, dict[str, np.ndarray]] = {}
        for full_name, value in state.items():
            if full_name == "step":
                continue
            name, _, buffer = full_name.rpartition("/")
            if name not in params or buffer not in self.buffers:
                raise KeyError(f"optimizer state {full_name!r} matches no parameter/buffer")
            if value.shape != params[name].shape:
                raise ValueError(f"optimizer state {full_name!r} has shape {value.shape}, "
                                 f"parameter has {params[name].shape}")
            restored.setdefault(name, {})[buffer] = np.array(value, params[name].dtype)
        for name, buffers in restored.items():
            if set(buffers) != set(self.buffers):
                raise KeyError(f"optimizer state of {name!r} lacks some of {self.buffers}")
        self.state = restored
        self.step_count = int(state["step"])


def _update_first_moment(exp_avg: np.ndarray, grad: np.ndarray, beta1: float) -> None:
    """exp_avg += (1 - beta1) * (grad - exp_avg), torch's ``exp_avg.lerp_(grad, 1 - beta1)``."""
    delta = grad - exp_avg
    delta *= 1 - beta1
    exp_avg += delta


def _check_betas(betas: tuple[float, float], eps: float) -> tuple[float, float]:
    beta1, beta2 = betas
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0) or eps < 0:
        raise ValueError("betas must be in [0, 1) and eps >= 0")
    return float(beta1), float(beta2)


class _MomentOptimizer(Optimizer):
    """What Adam and AdaMax share: a first moment decayed by ``betas[0]``, a second
    statistic decayed by ``betas[1]``, ``eps``, and Kingma & Ba's default learning rate."""

    default_lr: float

    def __init__(self, layers: Iterable[Layer], lr: float | None = None,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(layers, self.default_lr if lr is None else lr, weight_decay)
        self.betas, self.eps = _check_betas(betas, eps), eps


class Adam(_MomentOptimizer):
    """Adam, as ``torch.optim.Adam(params, lr=1e-3, betas, eps, weight_decay)``."""

    buffers = ("exp_avg", "exp_avg_sq")
    default_lr = 1e-3

    def _step(self, param, grad, state, step):
        beta1, beta2 = self.betas
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        _update_first_moment(exp_avg, grad, beta1)
        exp_avg_sq *= beta2
        squared = grad * (1 - beta2)  # torch's addcmul order: (value * g) * g
        squared *= grad
        exp_avg_sq += squared
        step_size = self.lr / (1 - beta1 ** step)
        denom = np.sqrt(exp_avg_sq)
        denom /= (1 - beta2 ** step) ** 0.5
        denom += self.eps
        update = np.divide(exp_avg, denom, out=denom)
        update *= step_size
        param -= update


class AdaMax(_MomentOptimizer):
    """AdaMax, as ``torch.optim.Adamax(params, lr=2e-3, betas, eps, weight_decay)``: Adam
    with the infinity norm ``u = max(beta2 * u, |g| + eps)`` in place of the second moment."""

    buffers = ("exp_avg", "exp_inf")
    default_lr = 2e-3

    def _step(self, param, grad, state, step):
        beta1, beta2 = self.betas
        exp_avg, exp_inf = state["exp_avg"], state["exp_inf"]
        _update_first_moment(exp_avg, grad, beta1)
        exp_inf *= beta2
        norm = np.abs(grad)
        norm += self.eps
        np.maximum(exp_inf, norm, out=exp_inf)
        update = np.divide(exp_avg, exp_inf, out=norm)
        update *= self.lr / (1 - beta1 ** step)
        param -= update
