"""Layers of the NumPy CNN: forward and backward on NCHW arrays, NumPy only.

Every layer follows one protocol:

- ``forward(x)`` computes the output and keeps what backward needs in ``self.cache``.
- ``backward(grad_out)`` returns the gradient with respect to the last forward's input and
  *adds* the parameter gradients into ``self.grads`` (accumulated until :meth:`zero_grad`).
- ``params`` / ``grads`` are dicts keyed ``"weight"`` and ``"bias"`` holding arrays in
  PyTorch's shapes, so weights copy across frameworks unchanged:
  Conv2D weight ``(out, in, kh, kw)``, Linear weight ``(out, in)``, biases ``(out,)``.

Arrays are float32 by default; every layer also runs in float64 (``layer.astype(np.float64)``)
so gradients can be checked against central differences.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from labctl.worker.numpy_cnn.parallel import parallel_matmul


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int | np.integer) else tuple(value)
    if len(pair) != 2 or any(int(v) != v for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return int(pair[0]), int(pair[1])


def he_normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int,
              dtype: np.dtype | type = np.float32) -> np.ndarray:
    """Kaiming/He normal initialisation for ReLU networks: N(0, 2 / fan_in)."""
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)


class Layer:
    """Base class: parameter/gradient dicts, the forward cache and ``zero_grad``."""

    def __init__(self) -> None:
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.cache: tuple | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x: the layer's input (each subclass documents its shapes) -> its output. Keeps in
        ``self.cache`` what backward needs."""
        raise NotImplementedError

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """grad_out: d loss / d output, shaped like forward's output -> d loss / d input,
        shaped like forward's input. Adds (never assigns) into ``self.grads``."""
        raise NotImplementedError

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    def zero_grad(self) -> None:
        for grad in self.grads.values():
            grad.fill(0)

    def astype(self, dtype: np.dtype | type) -> Layer:
        """Cast parameters and gradients in place (float64 for gradient checks)."""
        for name in self.params:
            self.params[name] = self.params[name].astype(dtype)
            self.grads[name] = self.grads[name].astype(dtype)
        return self

    def _add_param(self, name: str, value: np.ndarray) -> None:
        self.params[name] = value
        self.grads[name] = np.zeros_like(value)

    def _cached(self) -> tuple:
        if self.cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        return self.cache

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.params.items())
        return f"{type(self).__name__}({shapes})"


class Conv2D(Layer):
    """2-D convolution (cross-correlation, as torch) by im2col + one batched GEMM.

    x: (N, C, H, W) -> (N, F, Ho, Wo) with Ho = (H + 2*ph - kh) // sh + 1 (Wo likewise).
    weight: (F, C, kh, kw); bias: (F,). ``kernel_size``, ``stride`` and ``padding`` take an
    int or an (h, w) pair. The im2col matrix is cached for backward; the input gradient is
    its transpose, col2im, summed with one strided add per kernel offset (kh*kw adds, no
    Python loop over pixels, no ``np.add.at``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 *, rng: np.random.Generator | None = None,
                 dtype: np.dtype | type = np.float32) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise ValueError("kernel_size and stride must be >= 1, padding >= 0")
        rng = rng if rng is not None else np.random.default_rng()
        kh, kw = self.kernel_size
        fan_in = in_channels * kh * kw
        self._add_param("weight", he_normal(rng, (out_channels, in_channels, kh, kw), fan_in,
                                            dtype))
        self._add_param("bias", np.zeros(out_channels, dtype))

    def output_shape(self, height: int, width: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        out_h, out_w = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
        if out_h < 1 or out_w < 1:
            raise ValueError(f"input {height}x{width} is smaller than the kernel {kh}x{kw}")
        return out_h, out_w

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x: (N, C, H, W) -> (N, F, Ho, Wo)."""
        n, c, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(f"Conv2D expects {self.in_channels} channels, got {c}")
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        out_h, out_w = self.output_shape(h, w)
        padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if ph or pw else x
        # windows[n, c, i, j, ki, kj] = padded[n, c, i*sh + ki, j*sw + kj]
        windows = sliding_window_view(padded, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
        windows = windows[:, :, :out_h, :out_w]
        # cols: (N, C*kh*kw, Ho*Wo); rows ordered (c, ki, kj) like the flattened weight.
        cols = np.ascontiguousarray(windows.transpose(0, 1, 4, 5, 2, 3)).reshape(
            n, c * kh * kw, out_h * out_w)
        weight = self.params["weight"].reshape(self.out_channels, -1)
        out = np.matmul(weight, cols)                      # (N, F, Ho*Wo)
        out += self.params["bias"][:, None]
        self.cache = (x.shape, padded.shape, cols)
        return out.reshape(n, self.out_channels, out_h, out_w)

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """grad_out: (N, F, Ho, Wo) -> grad_in: (N, C, H, W)."""
        x_shape, padded_shape, cols = self._cached()
        n, f, out_h, out_w = grad_out.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        grad = grad_out.reshape(n, f, out_h * out_w)
        weight = self.params["weight"]
        self.grads["weight"] += np.tensordot(grad, cols, axes=([0, 2], [0, 2])).reshape(
            weight.shape)
        self.grads["bias"] += grad.sum(axis=(0, 2))
        grad_cols = np.matmul(weight.reshape(f, -1).T, grad)  # (N, C*kh*kw, Ho*Wo)
        grad_cols = grad_cols.reshape(n, self.in_channels, kh, kw, out_h, out_w)
        grad_padded = np.zeros(padded_shape, np.result_type(grad_out, weight))
        for ki in range(kh):
            for kj in range(kw):
                grad_padded[:, :, ki:ki + sh * out_h:sh, kj:kj + sw * out_w:sw] += \
                    grad_cols[:, :, ki, kj]
        h, w = x_shape[2:]
        return grad_padded[:, :, ph:ph + h, pw:pw + w]


class Linear(Layer):
    """Fully connected layer. x: (N, in) -> (N, out) = x @ weight.T + bias.

    weight: (out, in); bias: (out,).
    """

    def __init__(self, in_features: int, out_features: int, *,
                 rng: np.random.Generator | None = None,
                 dtype: np.dtype | type = np.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        rng = rng if rng is not None else np.random.default_rng()
        self._add_param("weight", he_normal(rng, (out_features, in_features), in_features,
                                            dtype))
        self._add_param("bias", np.zeros(out_features, dtype))

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x: (N, in) -> (N, out)."""
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"Linear expects (N, {self.in_features}), got {x.shape}")
        self.cache = (x,)
        out = parallel_matmul(x, self.params["weight"].T)
        out += self.params["bias"]
        return out

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """grad_out: (N, out) -> grad_in: (N, in)."""
        (x,) = self._cached()
        self.grads["weight"] += parallel_matmul(grad_out.T, x)
        self.grads["bias"] += grad_out.sum(axis=0)
        return parallel_matmul(grad_out, self.params["weight"])


class MaxPool2D(Layer):
    """Max pooling. x: (N, C, H, W) -> (N, C, Ho, Wo), Ho = (H - kh) // sh + 1.

    ``stride`` defaults to ``kernel_size`` (as torch). Ties go to the first maximum in
    row-major window order, as torch does, so gradients match it exactly. Backward adds
    one masked strided slice per window offset, which also handles overlapping windows.
    """

    def __init__(self, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] | None = None) -> None:
        super().__init__()
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride if stride is not None else kernel_size, "stride")

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x: (N, C, H, W) -> (N, C, Ho, Wo)."""
        n, c, h, w = x.shape
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        out_h, out_w = (h - kh) // sh + 1, (w - kw) // sw + 1
        if out_h < 1 or out_w < 1:
            raise ValueError(f"input {h}x{w} is smaller than the pooling window {kh}x{kw}")
        windows = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
        flat = windows[:, :, :out_h, :out_w].reshape(n, c, out_h, out_w, kh * kw)
        argmax = flat.argmax(axis=-1)  # the first maximum, like torch
        self.cache = (x.shape, x.dtype, argmax)
        return np.take_along_axis(flat, argmax[..., None], axis=-1)[..., 0]

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """grad_out: (N, C, Ho, Wo) -> grad_in: (N, C, H, W)."""
        x_shape, dtype, argmax = self._cached()
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        out_h, out_w = argmax.shape[2:]
        grad_in = np.zeros(x_shape, np.result_type(grad_out, dtype))
        for ki in range(kh):
            for kj in range(kw):
                # A boolean multiply: np.where on an irregular mask is many times slower.
                grad_in[:, :, ki:ki + sh * out_h:sh, kj:kj + sw * out_w:sw] += \
                    grad_out * (argmax == ki * kw + kj)
        return grad_in


class ReLU(Layer):
    """max(x, 0), any shape: (N, ...) -> (N, ...)."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x: (N, C, H, W) or (N, D) -> same shape."""
        positive = x > 0
        self.cache = (positive,)
        return x * positive

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """grad_out: same shape as x -> grad_in: same shape."""
        (positive,) = self._cached()
        return grad_out * positive


class Sigmoid(Layer):
    """1 / (1 + exp(-x)), any shape, stable for large |x| (no overflow warnings)."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x: (N, ...) -> same shape, values in [0, 1]."""
        # exp(-log(1 + exp(-x))): logaddexp never overflows, whatever the sign of x.
        out = np.exp(-np.logaddexp(0, -x)).astype(x.dtype, copy=False)
        self.cache = (out,)
        return out

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """grad_out: same shape as x -> grad_in: same shape."""
        (out,) = self._cached()
        return grad_out * out * (1 - out)


class Flatten(Layer):
    """(N, C, H, W) -> (N, C*H*W) in C order, like torch.nn.Flatten."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x: (N, C, H, W) -> (N, C*H*W)."""
        self.cache = (x.shape,)
        return x.reshape(x.shape[0], -1)

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """grad_out: (N, C*H*W) -> grad_in: (N, C, H, W)."""
        (shape,) = self._cached()
        return grad_out.reshape(shape)
