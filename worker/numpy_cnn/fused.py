"""The fast path of the default network: Conv2D(stride 1) -> ReLU -> MaxPool2D(2) in one
block, on channels-last (NHWC) activations, in batch chunks spread over threads.

It computes exactly what the three per-layer classes compute (tests check it) and reads and
writes the wrapped :class:`Conv2D`'s ``params`` / ``grads``, so the optimizer, checkpoints and
torch weight copies see the ordinary layers. Where the time goes and why:

- **Pooling-ordered im2col.** The rows of the im2col matrix are ordered (dy, dx, n, py, px):
  the four pixels of every 2x2 pooling window lie in four contiguous blocks of the GEMM
  output, so max pooling is three ``np.maximum`` calls on contiguous arrays, and the
  "which pixel won" masks are three boolean arrays (first maximum wins, as torch).
- **ReLU and bias after pooling.** ``max`` commutes with adding a per-channel bias and with
  ``relu``, so both run on a quarter of the data.
- **Channels-last.** The im2col copy then moves runs of ``kw * C`` contiguous floats, and the
  GEMM output is already the next block's NHWC input.
- **Cache blocking and threads.** Each chunk of images goes through im2col -> GEMM -> pool
  while its buffers are still in cache; backward recomputes the chunk's im2col (a copy)
  instead of keeping a matrix 9x the size of the input. Chunks run on Python threads (NumPy
  releases the GIL) with BLAS held to one thread.
- **Input gradient as a transposed convolution.** The pooled gradient is scattered into a
  zero image (four strided copies), then one im2col + GEMM with the flipped kernel gives the
  input gradient directly; no col2im scatter-add. The first block skips it: nobody needs
  the gradient of the data.
"""

from __future__ import annotations

import threading

import numpy as np

from labctl.worker.numpy_cnn.layers import Conv2D, Layer, MaxPool2D, ReLU
from labctl.worker.numpy_cnn.parallel import Stage, batch_chunks, run_stages, sum_in_order

#: Target size of one chunk's im2col matrix: big enough for an efficient GEMM, small enough
#: to stay in cache (L2 is 512 KiB, L3 32 MiB on the Zen 3 we tuned on); measured best.
CHUNK_BYTES = 1024 * 1024

#: Blocks with at most this many input channels build im2col transposed (see __init__).
CHANNEL_MAJOR_MAX_CHANNELS = 1
#: Per-thread cap on cached buffers (a handful of chunk shapes per block is the norm).
MAX_SCRATCH_BUFFERS = 64

_scratch = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype: np.dtype, region: tuple = ()) -> np.ndarray:
    """A per-thread buffer reused across calls (fresh allocations would page-fault afresh).

    It is zero-filled when first made, so a padding border that is never written stays
    zero; ``region`` must then name the part callers write, so a buffer of the same shape
    written elsewhere (another padding) is never handed out in its place.
    """
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    key = (name, shape, np.dtype(dtype), region)
    buf = buffers.get(key)
    if buf is None:
        if len(buffers) >= MAX_SCRATCH_BUFFERS:  # many batch shapes seen: start afresh
            buffers.clear()
        buf = buffers[key] = np.zeros(shape, dtype)
    return buf


def sum_along(matrix: np.ndarray, axis: int) -> np.ndarray:
    """``matrix.sum(axis)`` of a 2-D array as one BLAS matrix-vector product with ones.

    NumPy reduces a C-order (M, F) array along axis 0 row by row; the GEMV reads it once
    at memory speed: measured 5-7x faster on bias-gradient shapes ((8k-64k, 32-64) float32).
    """
    ones = scratch("ones", (matrix.shape[axis],), matrix.dtype, region=("ones",))
    ones.fill(1)
    # np.dot releases the GIL around BLAS; np.matmul (and @) keep it when the output has 500
    # elements or fewer, as a bias gradient has: on two threads each such call then ran
    # 2.1-2.3x as long, the other thread waiting for the GIL (measured).
    return np.dot(ones, matrix) if axis == 0 else np.dot(matrix, ones)


def strided_view(base: np.ndarray, shape: tuple[int, ...],
                 strides: tuple[int, ...]) -> np.ndarray:
    """A view of the contiguous ``base`` with explicit strides, for reading only. Built with
    the ndarray constructor: ``as_strided`` costs ~25 us a call, too much per chunk."""
    return np.ndarray(shape, base.dtype, base, 0, strides)


def fusable(conv: Layer, relu: Layer, pool: Layer) -> bool:
    """Whether conv -> relu -> pool can run as one :class:`ConvReLUPool` block."""
    return (isinstance(conv, Conv2D) and isinstance(relu, ReLU) and isinstance(pool, MaxPool2D)
            and conv.stride == (1, 1) and conv.kernel_size[0] == conv.kernel_size[1]
            and conv.padding[0] == conv.padding[1] and conv.padding[0] < conv.kernel_size[0]
            and pool.kernel_size == (2, 2) and pool.stride == (2, 2))


class ConvReLUPool:
    """conv -> ReLU -> 2x2 max pool on NHWC arrays, sharing ``conv``'s parameters.

    forward x: (N, H, W, C) -> (N, H' // 2, W' // 2, F), with H' = H + 2p - k + 1 the
    convolution's output height (odd rows/columns are dropped by the pool, as torch).
    """

    channels_last = True

    def __init__(self, conv: Conv2D) -> None:
        self.conv = conv
        self.k = conv.kernel_size[0]
        self.pad = conv.padding[0]
        # One input channel (a grey first block): im2col transposed, so the copy runs along
        # image rows instead of 3-float snippets. Measured on the benchmark's blocks: 1.5x
        # faster for 1x28x28 -> 16, even for 1x64x64 -> 32, slower for C = 3 and beyond.
        self.channel_major = conv.in_channels <= CHANNEL_MAJOR_MAX_CHANNELS
        self.cache: tuple | None = None

    def __repr__(self) -> str:
        c = self.conv
        return (f"conv{self.k}x{self.k} {c.in_channels}->{c.out_channels}+relu+pool2x2 "
                "(fused)")

    def _shapes(self, x_shape: tuple[int, ...]) -> tuple[int, int]:
        _, h, w, _ = x_shape
        out_h, out_w = self.conv.output_shape(h, w)
        if out_h < 2 or out_w < 2:
            raise ValueError(f"input {h}x{w} leaves nothing to pool after the convolution")
        return out_h // 2, out_w // 2

    def _chunks(self, x: np.ndarray, pooled_pixels: int) -> list[slice]:
        """Batch slices of about CHUNK_BYTES of im2col each (see batch_chunks)."""
        n, _, _, c = x.shape
        bytes_per_image = 4 * pooled_pixels * self.k * self.k * c * x.itemsize
        return batch_chunks(n, CHUNK_BYTES // bytes_per_image)

    def _im2col(self, x: np.ndarray, part: slice, ph: int, pw: int) -> np.ndarray:
        """The chunk's im2col matrix: rows (dy, dx, n, py, px), columns (ky, kx, c), shape
        (4 * n*ph*pw, k*k*C); transposed, (k*k*C, 4 * n*ph*pw), if ``channel_major``."""
        xc = x[part]
        n, h, w, c = xc.shape
        k, p = self.k, self.pad
        padded = scratch("padded", (n, h + 2 * p, w + 2 * p, c), xc.dtype, region=(p,))
        padded[:, p:p + h, p:p + w] = xc
        sn, sh, sw, sc = padded.strides
        # Conv output pixel (2*py + dy, 2*px + dx) reads padded row 2*py + dy + ky.
        if self.channel_major:
            windows = strided_view(padded, (k, k, c, 2, 2, n, ph, pw),
                                   (sh, sw, sc, sh, sw, sn, 2 * sh, 2 * sw))
            cols = scratch("cols_t", (k * k * c, 4 * n * ph * pw), xc.dtype)
        else:
            windows = strided_view(padded, (2, 2, n, ph, pw, k, k, c),
                                   (sh, sw, sn, 2 * sh, 2 * sw, sh, sw, sc))
            cols = scratch("cols", (4 * n * ph * pw, k * k * c), xc.dtype)
        np.copyto(cols.reshape(windows.shape), windows)
        return cols

    # A block computes in its native layout, (rows, F) or, if channel_major, (F, rows), and
    # meets the NHWC arrays around it (output, incoming gradient) once each way. Mixing the
    # layouts inside the elementwise pooling code would stride across whole chunks.
    def _native(self, nhwc_rows: np.ndarray) -> np.ndarray:
        """An NHWC chunk seen as (rows, F), viewed in the native layout."""
        return nhwc_rows.T if self.channel_major else nhwc_rows

    def _blocks(self, name: str, rows: int, f: int, dtype: np.dtype) -> tuple[np.ndarray, list]:
        """A conv-output-sized buffer and its four window blocks, native layout."""
        if self.channel_major:
            buf = scratch(name + "_t", (f, 4, rows), dtype)
            return buf, [buf[:, i] for i in range(4)]
        buf = scratch(name, (4, rows, f), dtype)
        return buf, [buf[i] for i in range(4)]

    def _new_masks(self, n: int, pooled: int, f: int) -> np.ndarray:
        """Which pixel won each window, as three boolean arrays (see forward)."""
        shape = (3, f, n * pooled) if self.channel_major else (3, n * pooled, f)
        return np.empty(shape, bool)

    def _mask_views(self, masks: np.ndarray, part: slice, pooled: int) -> list[np.ndarray]:
        rows = slice(part.start * pooled, part.stop * pooled)
        return [masks[i, :, rows] if self.channel_major else masks[i, rows] for i in range(3)]

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """x: (N, H, W, C) -> (N, Ph, Pw, F). ``train=False`` skips the backward masks."""
        stage = self.forward_stage(x, train)
        run_stages([stage])
        return stage.output

    def forward_stage(self, x: np.ndarray, train: bool = True) -> Stage:
        """:meth:`forward` as a :class:`parallel.Stage`, for :func:`parallel.run_stages`."""
        weight, bias = self.conv.params["weight"], self.conv.params["bias"]
        n, f = x.shape[0], weight.shape[0]
        ph, pw = self._shapes(x.shape)
        dtype = np.result_type(x, weight)
        x = np.ascontiguousarray(x, dtype)
        # (ky, kx, c) x F, matching the im2col column order.
        w_mat = np.ascontiguousarray(weight.transpose(2, 3, 1, 0).reshape(-1, f), dtype)
        w_mat_t = np.ascontiguousarray(w_mat.T)
        out = np.empty((n, ph, pw, f), dtype)
        masks = self._new_masks(n, ph * pw, f) if train else None
        bias = bias[:, None] if self.channel_major else bias

        def run(part: slice) -> None:
            rows = (part.stop - part.start) * ph * pw
            cols = self._im2col(x, part, ph, pw)
            conv, b = self._blocks("conv", rows, f, dtype)
            if self.channel_major:
                np.matmul(w_mat_t, cols, out=conv.reshape(f, 4 * rows))
            else:
                np.matmul(cols, w_mat, out=conv.reshape(4 * rows, f))
            # Window order (0,0), (0,1), (1,0), (1,1); strict ">" keeps the first maximum.
            if masks is not None:
                m01, m23, m_hi = self._mask_views(masks, part, ph * pw)
                np.greater(b[1], b[0], out=m01)
                np.greater(b[3], b[2], out=m23)
            np.maximum(b[0], b[1], out=b[0])
            np.maximum(b[2], b[3], out=b[2])
            if masks is not None:
                np.greater(b[2], b[0], out=m_hi)
            np.maximum(b[0], b[2], out=b[0])
            b[0] += bias
            np.maximum(b[0], 0, out=self._native(out[part].reshape(rows, f)))

        def finish(_: list) -> None:
            if train:  # an evaluation forward leaves the pending backward's cache alone
                self.cache = (x, out, masks)

        return Stage(run, self._chunks(x, ph * pw), out, finish)

    def backward(self, grad_out: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """grad_out: (N, Ph, Pw, F) -> grad_in: (N, H, W, C), or None if not ``input_grad``.
        Adds the weight and bias gradients into ``conv.grads``."""
        stage = self.backward_stage(grad_out, input_grad)
        run_stages([stage])
        return stage.output

    def backward_stage(self, grad_out: np.ndarray, input_grad: bool = True) -> Stage:
        """:meth:`backward` as a :class:`parallel.Stage` whose output is grad_in (None if not
        ``input_grad``); its ``finish`` adds the summed weight and bias gradients."""
        if self.cache is None:
            raise RuntimeError("ConvReLUPool.backward called before a training forward")
        x, out, masks = self.cache
        weight = self.conv.params["weight"]
        n, h, w, c = x.shape
        f, k, p = weight.shape[0], self.k, self.pad
        ph, pw = out.shape[1:3]
        dtype = out.dtype
        grad_out = np.ascontiguousarray(grad_out, dtype)
        # Input gradient = correlation of the zero-padded output gradient with the kernel
        # flipped in space and transposed in channels: rows (u, v, f), columns c.
        w_flip = np.ascontiguousarray(
            weight[:, :, ::-1, ::-1].transpose(2, 3, 0, 1).reshape(-1, c), dtype)
        grad_in = np.empty_like(x) if input_grad else None
        offset = k - 1 - p  # conv output row r sits at row r + offset of the padded gradient

        def run(part: slice) -> tuple[np.ndarray, np.ndarray]:
            nc = part.stop - part.start
            rows = nc * ph * pw
            m01, m23, m_hi = self._mask_views(masks, part, ph * pw)
            g_pool = scratch("g_pool", m01.shape, dtype)
            np.multiply(self._native(grad_out[part].reshape(rows, f)),
                        self._native(out[part].reshape(rows, f)) > 0, out=g_pool)
            bias_grad = sum_along(g_pool, 1 if self.channel_major else 0)
            # Route each pooled gradient to the window pixel that won (boolean multiplies).
            g_conv, g = self._blocks("g_conv", rows, f, dtype)
            np.multiply(g_pool, m_hi, out=g[2])          # to the lower pair (1,0)/(1,1)
            np.subtract(g_pool, g[2], out=g[0])          # to the upper pair (0,0)/(0,1)
            np.multiply(g[2], m23, out=g[3])
            np.subtract(g[2], g[3], out=g[2])
            np.multiply(g[0], m01, out=g[1])
            np.subtract(g[0], g[1], out=g[0])
            cols = self._im2col(x, part, ph, pw)  # recomputed: cheaper than keeping it
            if self.channel_major:                # (F, k*k*C) either way
                weight_grad = np.dot(g_conv.reshape(f, 4 * rows), cols.T)  # GIL: sum_along
            else:
                weight_grad = np.dot(g_conv.reshape(4 * rows, f).T, cols)
            if grad_in is not None:
                padded = scratch("g_padded", (nc, h + k - 1, w + k - 1, f), dtype,
                                 region=(offset, ph, pw))
                for dy in range(2):
                    for dx in range(2):
                        block = g[2 * dy + dx]
                        padded[:, offset + dy:offset + 2 * ph:2,
                               offset + dx:offset + 2 * pw:2] = \
                            self._native(block).reshape(nc, ph, pw, f)
                sn, sh, sw, sf = padded.strides
                windows = strided_view(padded, (nc, h, w, k, k, f), (sn, sh, sw, sh, sw, sf))
                g_cols = scratch("g_cols", windows.shape, dtype)
                np.copyto(g_cols, windows)
                np.matmul(g_cols.reshape(nc * h * w, -1), w_flip,
                          out=grad_in[part].reshape(nc * h * w, c))
            return weight_grad, bias_grad

        def finish(results: list) -> None:
            weight_grad, bias_grad = sum_in_order(results)
            self.conv.grads["weight"] += weight_grad.reshape(f, k, k, c).transpose(0, 3, 1, 2)
            self.conv.grads["bias"] += bias_grad

        return Stage(run, self._chunks(x, ph * pw), grad_in, finish)
