"""The general fast path: any Conv2D (+ ReLU/Sigmoid) (+ MaxPool2D), and Linear (+ ReLU/Sigmoid),
each run as one block over the wrapped layers' ``params`` / ``grads``.

The mechanisms are those that made the default network's fused block
(:mod:`worker.numpy_cnn.fused`) fast, made general:

- **Channels-last (NHWC) activations.** The im2col matrix of a chunk is a strided *view* of
  the padded chunk, shape (n, Ho, Wo, kh, kw, C), copied once into a reused buffer; its
  GEMM with the (kh*kw*C + 1, F) weight matrix (the bias its last row) writes the NHWC
  output directly, which is the next convolution's input with no transpose.
- **Cache-sized batch chunks over threads**, BLAS held to one thread: each chunk goes
  im2col -> GEMM (with the bias) -> pool -> activation while its buffers are in cache;
  backward recomputes the chunk's im2col rather than keeping a matrix kh*kw times the input.
  A block's pass is a :class:`parallel.Stage`, so :class:`model.Sequential` runs
  consecutive conv blocks as one pipeline (:func:`parallel.run_stages`).
- **Elementwise work fused in place.** The bias rides in the GEMM (a column of ones in
  the im2col matrix, the bias as the weight matrix's last row), so backward's weight-gradient
  GEMM also yields the bias gradient. Pooling and the activation run on the GEMM's output
  buffer; since max commutes with any non-decreasing activation, the activation runs
  *after* pooling, on the pooled data. Backward uses the saved (activated) output:
  ReLU' = out > 0, Sigmoid' = out * (1 - out).
- **Input gradient as a transposed convolution**: one im2col + GEMM per row phase of
  the stride (one in all for a row stride of 1, see :meth:`ConvBlock._input_grad`), writing
  whole input rows; no col2im scatter-add, no ``np.add.at``. Max-pool backward routes the
  gradient with one masked strided add per window offset. The first block of a network
  skips its input gradient.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from labctl.worker.numpy_cnn.fused import CHUNK_BYTES, scratch, strided_view
from labctl.worker.numpy_cnn.layers import Conv2D, Layer, Linear, MaxPool2D, ReLU, Sigmoid
from labctl.worker.numpy_cnn.parallel import (
    Stage,
    batch_chunks,
    parallel_matmul,
    run_stages,
    sum_in_order,
)

ACTIVATIONS = (ReLU, Sigmoid)
#: Per-thread cap on cached plans (a few chunk shapes per block is the norm).
MAX_PLANS = 64

_plans = threading.local()


def plan(key: tuple, build: Callable[[], tuple]) -> tuple:
    """The per-thread plan for ``key`` (a chunk shape and a block's geometry), built once:
    the scratch buffers and strided views a chunk loop uses, so each chunk only runs its
    copies and GEMMs. Making the views afresh cost ~20 us of Python per backward chunk,
    against a chunk's ~300 us of arithmetic (measured). Plans hold only buffers and
    views, never weights, so blocks of the same geometry share them."""
    plans = getattr(_plans, "plans", None)
    if plans is None:
        plans = _plans.plans = {}
    found = plans.get(key)
    if found is None:
        if len(plans) >= MAX_PLANS:
            plans.clear()
        found = plans[key] = build()
    return found


#: Blocks with at most this many input channels build im2col transposed (see _im2col).
#: Measured on case (d)'s 3->32 first block: 10-20% faster forward, backward no slower.
CHANNEL_MAJOR_MAX_CHANNELS = 3
#: Row length (elements) :func:`wide_rows` aims for.
ROW_ELEMENTS = 256


def activation_name(layer: Layer | None) -> str | None:
    """"relu", "sigmoid" or None for the activation layer a block absorbs."""
    if layer is None:
        return None
    return "relu" if isinstance(layer, ReLU) else "sigmoid"


def wide_rows(values: np.ndarray) -> np.ndarray:
    """A contiguous (..., F) array as a 2-D view whose rows are its trailing dimensions
    (from F outwards) up to at least ROW_ELEMENTS long, so every row is a whole number of
    channel vectors. Binary ufuncs with a broadcast row run their SIMD loop over each row:
    on (rows, F) with F = 32 a per-channel bias add took 2x as long (measured)."""
    length = 1
    for dim in reversed(values.shape[1:] or values.shape):
        length *= dim
        if length >= ROW_ELEMENTS:
            break
    return values.reshape(-1, length)


def im2col_buffer(shape: tuple[int, int], dtype: np.dtype, ones_row: bool) -> np.ndarray:
    """A per-thread im2col buffer whose last column (last row with ``ones_row``, for the
    channel-major layout) is ones, which the weight matrix's bias row multiplies: the GEMM
    adds the bias, and backward's weight-gradient GEMM sums the bias gradient, saving a pass
    over the output and one over its gradient. Nothing else writes that line: filled once."""
    buffer = scratch("conv_cols", shape, dtype, region=("ones", ones_row))
    line = buffer[-1] if ones_row else buffer[:, -1]
    if line[0] != 1:
        line.fill(1)
    return buffer


def zeros_row(length: int, dtype: np.dtype) -> np.ndarray:
    """A per-thread (length,) buffer of zeros that nothing writes."""
    return scratch("zeros_row", (length,), dtype, region=("zeros",))


def activate_(values: np.ndarray, activation: str | None, halved: bool = False) -> None:
    """Apply the activation in place on ``values`` (a 2-D view, e.g. :func:`wide_rows`);
    ``halved``: for a sigmoid, ``values`` hold x / 2 already (the weights were halved)."""
    if activation == "relu":
        # max against a row of zeros, not the scalar 0: NumPy's maximum has no SIMD loop
        # for a scalar operand (measured 3x slower than against a broadcast row).
        np.maximum(values, zeros_row(values.shape[-1], values.dtype), out=values)
    elif activation == "sigmoid":
        # sigmoid(x) = (1 + tanh(x / 2)) / 2: tanh saturates to +-1 without overflow and
        # its SIMD loop is 2x as fast as exp; with the scalar multiplies and add the four
        # passes take 0.6x the time of 1 / (1 + exp(-x)) (measured, float32).
        if not halved:
            values *= 0.5
        np.tanh(values, out=values)
        values *= 0.5
        values += 0.5


def activation_grad(grad_out: np.ndarray, out: np.ndarray, activation: str | None,
                    into: np.ndarray) -> np.ndarray:
    """d loss / d pre-activation from the gradient and the saved *activated* output,
    written into ``into`` (same shape)."""
    if activation == "relu":
        np.multiply(grad_out, out > 0, out=into)
    elif activation == "sigmoid":
        np.subtract(1, out, out=into)
        into *= out
        into *= grad_out
    else:
        np.copyto(into, grad_out)
    return into


class ConvBlock:
    """Conv2D (any kernel, stride, padding, non-square input) -> optional ReLU/Sigmoid ->
    optional MaxPool2D (any window and stride), on NHWC arrays, sharing ``conv``'s params.

    forward x: (N, H, W, C) -> (N, Ho, Wo, F), or (N, Po, Qo, F) after pooling, with
    Ho = (H + 2*ph - kh) // sh + 1 and Po = (Ho - pkh) // psh + 1 (Wo, Qo likewise).
    """

    channels_last = True

    def __init__(self, conv: Conv2D, activation: Layer | None = None,
                 pool: MaxPool2D | None = None) -> None:
        self.conv = conv
        self.activation = activation_name(activation)
        self.pool = pool
        self.cache: tuple | None = None

    def __repr__(self) -> str:
        c = self.conv
        parts = [f"conv{c.kernel_size[0]}x{c.kernel_size[1]}/s{c.stride[0]} "
                 f"{c.in_channels}->{c.out_channels}"]
        if self.activation:
            parts.append(self.activation)
        if self.pool:
            parts.append(f"pool{self.pool.kernel_size[0]}x{self.pool.kernel_size[1]}")
        return "+".join(parts)

    def _shapes(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(Ho, Wo) of the convolution and (Po, Qo) of the block's output."""
        out_h, out_w = self.conv.output_shape(h, w)
        if self.pool is None:
            return out_h, out_w, out_h, out_w
        (pkh, pkw), (psh, psw) = self.pool.kernel_size, self.pool.stride
        po, qo = (out_h - pkh) // psh + 1, (out_w - pkw) // psw + 1
        if po < 1 or qo < 1:
            raise ValueError(f"convolution output {out_h}x{out_w} is smaller than the "
                             f"pooling window {pkh}x{pkw}")
        return out_h, out_w, po, qo

    def _chunks(self, n: int, bytes_per_image: int) -> list[slice]:
        """Batch slices of about CHUNK_BYTES of im2col each (see batch_chunks)."""
        return batch_chunks(n, CHUNK_BYTES // max(1, bytes_per_image))

    def _im2col(self, x: np.ndarray, part: slice, out_h: int, out_w: int) -> np.ndarray:
        """The chunk's im2col matrix (n*Ho*Wo, kh*kw*C), columns (ky, kx, c).

        With few input channels it is the transpose of a contiguous (kh*kw*C, n*Ho*Wo)
        buffer: the copy then runs along image rows instead of kw*C-float snippets, and
        BLAS takes the transposed operand as it is. With padding, the buffers and views
        come from a per-thread plan for the chunk's shape (see :func:`plan`)."""
        xc = x[part]
        n, h, w, c = xc.shape
        (ph, pw) = self.conv.padding
        if not (ph or pw):
            return self._windows_into_cols(xc, out_h, out_w)[2]
        key = ("im2col", xc.shape, xc.dtype, self.conv.kernel_size, self.conv.stride,
               (ph, pw), out_h, out_w)
        interior, windows, cols, result = plan(key, lambda: self._im2col_plan(xc, out_h, out_w))
        np.copyto(interior, xc)
        np.copyto(cols, windows)
        return result

    def _im2col_plan(self, xc: np.ndarray, out_h: int, out_w: int) -> tuple:
        """(padded interior, windows view, cols buffer, im2col matrix view) for chunks
        shaped like ``xc``; the padded buffer's border stays zero."""
        n, h, w, c = xc.shape
        (ph, pw) = self.conv.padding
        padded = scratch("conv_padded", (n, h + 2 * ph, w + 2 * pw, c), xc.dtype,
                         region=(ph, pw))
        windows, cols, result = self._windows_into_cols(padded, out_h, out_w, copy=False)
        return padded[:, ph:ph + h, pw:pw + w], windows, cols, result

    def _windows_into_cols(self, padded: np.ndarray, out_h: int, out_w: int,
                           copy: bool = True) -> tuple:
        """(windows view of ``padded``, cols buffer, im2col matrix view), the windows
        copied into cols if ``copy``."""
        n, _, _, c = padded.shape
        (kh, kw), (sh, sw) = self.conv.kernel_size, self.conv.stride
        s_n, s_h, s_w, s_c = padded.strides
        k, rows = kh * kw * c, n * out_h * out_w
        if c <= CHANNEL_MAJOR_MAX_CHANNELS:
            windows = strided_view(padded, (kh, kw, c, n, out_h, out_w),
                                   (s_h, s_w, s_c, s_n, sh * s_h, sw * s_w))
            matrix = im2col_buffer((k + 1, rows), padded.dtype, ones_row=True)
            cols, result = matrix[:k].reshape(windows.shape), matrix.T
        else:
            windows = strided_view(padded, (n, out_h, out_w, kh, kw, c),
                                   (s_n, sh * s_h, sw * s_w, s_h, s_w, s_c))
            result = im2col_buffer((rows, k + 1), padded.dtype, ones_row=False)
            cols = result[:, :k].reshape(windows.shape)  # a view: rows keep their stride
        if copy:
            np.copyto(cols, windows)
        return windows, cols, result

    def _weight_matrix(self, dtype: np.dtype) -> np.ndarray:
        """(kh*kw*C + 1, F): the weights, rows in the im2col column order, then the bias,
        which the im2col matrix's column of ones multiplies. Halved before a sigmoid, whose
        tanh form starts by halving its input (see :func:`activate_`)."""
        weight, bias = self.conv.params["weight"], self.conv.params["bias"]
        matrix = np.empty((weight[0].size + 1, weight.shape[0]), dtype)
        matrix[:-1] = weight.transpose(2, 3, 1, 0).reshape(-1, weight.shape[0])
        matrix[-1] = bias
        if self.activation == "sigmoid":
            matrix *= 0.5
        return matrix

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """x: (N, H, W, C) -> (N, Po, Qo, F). ``train=False`` keeps no cache."""
        stage = self.forward_stage(x, train)
        run_stages([stage])
        return stage.output

    def forward_stage(self, x: np.ndarray, train: bool = True) -> Stage:
        """:meth:`forward` as a :class:`parallel.Stage` (its output allocated, not yet
        written), so :class:`model.Sequential` can pipeline it with the next block."""
        weight = self.conv.params["weight"]
        n, h, w, c = x.shape
        if c != self.conv.in_channels:
            raise ValueError(f"Conv2D expects {self.conv.in_channels} channels, got {c}")
        f = weight.shape[0]
        out_h, out_w, po, qo = self._shapes(h, w)
        dtype = np.result_type(x, weight)
        x = np.ascontiguousarray(x, dtype)
        w_mat = self._weight_matrix(dtype)
        out = np.empty((n, po, qo, f), dtype)
        argmax = np.empty((n, po, qo, f), np.uint8) if train and self.pool else None
        pool = self.pool

        def run(part: slice) -> None:
            nc = part.stop - part.start
            cols = self._im2col(x, part, out_h, out_w)
            if pool is None:
                conv = out[part]
                np.matmul(cols, w_mat, out=conv.reshape(-1, f))
            else:
                conv = scratch("conv_out", (nc, out_h, out_w, f), dtype)
                np.matmul(cols, w_mat, out=conv.reshape(-1, f))
                self._pool_forward(conv, out[part], None if argmax is None else argmax[part])
            activate_(wide_rows(out[part]), self.activation, halved=True)

        def finish(_: list) -> None:
            if train:  # an evaluation forward leaves the pending backward's cache alone
                self.cache = (x, out, argmax, (out_h, out_w))

        chunks = self._chunks(n, out_h * out_w * weight[0].size * x.itemsize)
        return Stage(run, chunks, out, finish)

    def _pool_forward(self, conv: np.ndarray, best: np.ndarray,
                      argmax: np.ndarray | None) -> None:
        """Max over each window of ``conv`` (n, Ho, Wo, F) into ``best`` (n, Po, Qo, F);
        ``argmax`` gets the winning offset ki*pkw + kj, the first maximum on ties (torch)."""
        (pkh, pkw), (psh, psw) = self.pool.kernel_size, self.pool.stride
        po, qo = best.shape[1:3]
        np.copyto(best, conv[:, :psh * po:psh, :psw * qo:psw])
        if argmax is not None:
            argmax.fill(0)
            won = scratch("pool_won", best.shape, np.bool_)
        for ki in range(pkh):
            for kj in range(pkw):
                if ki == kj == 0:
                    continue
                window = conv[:, ki:ki + psh * po:psh, kj:kj + psw * qo:psw]
                if argmax is not None:
                    np.greater(window, best, out=won)
                    np.copyto(argmax, ki * pkw + kj, where=won)
                np.maximum(best, window, out=best)

    def _pool_backward(self, g_pooled: np.ndarray, argmax: np.ndarray,
                       out_h: int, out_w: int) -> np.ndarray:
        """Route g_pooled (n, Po, Qo, F) to the winners: (n, Ho, Wo, F)."""
        (pkh, pkw), (psh, psw) = self.pool.kernel_size, self.pool.stride
        n, po, qo, f = g_pooled.shape
        g_conv = scratch("g_conv", (n, out_h, out_w, f), g_pooled.dtype)
        g_conv.fill(0)
        routed = scratch("g_routed", g_pooled.shape, g_pooled.dtype)
        for ki in range(pkh):
            for kj in range(pkw):
                np.multiply(g_pooled, argmax == ki * pkw + kj, out=routed)
                g_conv[:, ki:ki + psh * po:psh, kj:kj + psw * qo:psw] += routed
        return g_conv

    def _column_phases(self) -> tuple[list[tuple[int, int, int, int]], int, int]:
        """How the stride's column phases share one window of the gradient (see
        :meth:`_input_grad`): ([(rx, x0, u0, taps)] for rx in [0, sw), first offset, width).

        Input column x0 + sw*u of phase rx (x0 its first column) gets g column u + u0 - s
        times kernel column kx = rx + sw*s, for s < taps; so every phase reads g columns
        u + d for d in [first, first + width), and a tap it does not have is a zero weight."""
        kw, sw, pw = self.conv.kernel_size[1], self.conv.stride[1], self.conv.padding[1]
        columns = []
        for rx in range(sw):
            x0 = (rx - pw) % sw
            columns.append((rx, x0, (x0 + pw - rx) // sw, len(range(rx, kw, sw))))
        used = [(u0 - taps + 1, u0) for _, _, u0, taps in columns if taps]
        first = min(low for low, _ in used)
        return columns, first, max(high for _, high in used) - first + 1

    def _phase_weights(self, dtype: np.dtype) -> list[np.ndarray | None]:
        """The transposed convolution's weights by row phase (see :meth:`_input_grad`): for
        each ry in [0, sh), the kernel rows ky = ry + sh*t (flipped) against every column
        phase's taps, as a (Th * width * F, sw * C) matrix, or None when no row has taps."""
        weight = self.conv.params["weight"]
        f, c = weight.shape[:2]
        (sh, sw) = self.conv.stride
        columns, first, width = self._column_phases()
        phases: list[np.ndarray | None] = []
        for ry in range(sh):
            rows = weight[:, :, ry::sh][:, :, ::-1]                 # (F, C, Th, kw)
            if rows.shape[2] == 0:
                phases.append(None)
                continue
            merged = np.zeros((rows.shape[2], width, f, sw, c), dtype)
            for rx, x0, u0, taps in columns:
                for step in range(taps):                            # kx = rx + sw*step
                    merged[:, u0 - step - first, :, x0] = rows[:, :, :, rx + sw * step] \
                        .transpose(2, 0, 1)
            phases.append(merged.reshape(-1, sw * c))
        return phases

    def _input_grad(self, g: np.ndarray, phases: list, grad_in: np.ndarray,
                    size: tuple[int, int]) -> None:
        """grad_in (n, H, W, C) = the transposed convolution of g (n, Ho, Wo, F).

        Padded input row yp = sh*i + ky gets g[i] * W[ky]; split by phase ry = yp % sh,
        row yp = sh*v + ry gets sum_t g[v - t] * W[ry + sh*t]: a stride-1 correlation of g
        with that phase's taps (flipped), and likewise along columns. So each row phase is
        one im2col copy of the zero-bordered g and one GEMM whose output columns are the sw
        column phases' pixels side by side, i.e. whole input rows: all the summing happens
        inside the GEMM, with no col2im scatter and no zero-stuffed rows. The column phases
        share one window of g (:meth:`_column_phases`); a tap one of them lacks is a zero
        weight, which costs GEMM work (4/3 for a 3x3 kernel at stride 2) but saves a copy and
        a GEMM per column phase and gives the GEMM sw times the columns: on case (c)'s 16->32
        stride-2 block the input gradient took 20% less time, the step 2-3% (measured).
        Unless the rows are grad_in's own (stride 1 down), they land in grad_in as one copy
        of W*C-float runs.
        """
        w = size[1]
        key = ("input_grad", g.shape, g.dtype, size, grad_in.shape[3], self.conv.kernel_size,
               self.conv.stride, self.conv.padding)
        interior, row_phases = plan(key, lambda: self._input_grad_plan(g, grad_in.shape[3], size))
        np.copyto(interior, g)
        sh = self.conv.stride[0]
        for ry, y0, whole, lanes, windows, cols, flat in row_phases:
            target = (grad_in if whole is None else whole).reshape(lanes, -1)
            if windows is None:                             # kernel shorter than the stride
                target[...] = 0
            else:
                np.copyto(cols, windows)
                np.matmul(flat, phases[ry], out=target)
            if whole is not None:
                np.copyto(grad_in[:, y0::sh], whole[:, :, :w])

    def _input_grad_plan(self, g: np.ndarray, c: int, size: tuple[int, int]) -> tuple:
        """The buffers and views :meth:`_input_grad` uses for chunks shaped like ``g``:
        (interior of the zero-bordered g, [(ry, y0, row buffer or None, GEMM rows, windows,
        cols, cols as a matrix; these three None without taps)] per row phase that has
        input rows)."""
        (kh, kw), (sh, sw), (ph, pw) = self.conv.kernel_size, self.conv.stride, self.conv.padding
        h, w = size
        n, out_h, out_w, f = g.shape
        lanes_x = -(-w // sw)        # pixels of the fullest column phase; each phase fills
        row_w = sw * lanes_x         # lanes_x of a row_w-wide row, the last ones past w
        top, left = -(-kh // sh) - 1, -(-kw // sw) - 1  # zero rows/cols before g
        rows = top + max(out_h, (h - 1 + ph) // sh + 1)
        columns = left + max(out_w, (row_w - 1 + pw) // sw + 1)
        grown = scratch("g_grown", (n, rows, columns, f), g.dtype, region=(top, left, out_h, out_w))
        s_n, s_h, s_w, s_f = grown.strides
        _, first, width = self._column_phases()
        row_phases = []
        for ry in range(sh):
            y0 = (ry - ph) % sh                             # first input row of the phase
            count_y = len(range(y0, h, sh))
            if count_y == 0:
                continue
            direct = sh == 1 and row_w == w                 # grad_in's rows are the buffer
            whole = None if direct else scratch("g_rows", (n, count_y, row_w, c), g.dtype)
            lanes, t_h = n * count_y * lanes_x, len(range(ry, kh, sh))
            if t_h == 0:
                row_phases.append((ry, y0, whole, lanes, None, None, None))
                continue
            v0 = (y0 + ph - ry) // sh
            start = (top - t_h + 1 + v0) * s_h + (left + first) * s_w
            windows = np.ndarray((n, count_y, lanes_x, t_h, width, f), g.dtype, grown, start,
                                 (s_n, s_h, s_w, s_h, s_w, s_f))
            cols = scratch("g_cols", windows.shape, g.dtype)
            row_phases.append((ry, y0, whole, lanes, windows, cols, cols.reshape(lanes, -1)))
        return grown[:, top:top + out_h, left:left + out_w], row_phases

    def backward(self, grad_out: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """grad_out: (N, Po, Qo, F) -> grad_in: (N, H, W, C), or None if not ``input_grad``.
        Adds the weight and bias gradients into ``conv.grads``."""
        stage = self.backward_stage(grad_out, input_grad)
        run_stages([stage])
        return stage.output

    def backward_stage(self, grad_out: np.ndarray, input_grad: bool = True) -> Stage:
        """:meth:`backward` as a :class:`parallel.Stage` whose output is grad_in (None if not
        ``input_grad``); its ``finish`` adds the summed weight and bias gradients."""
        if self.cache is None:
            raise RuntimeError("ConvBlock.backward called before a training forward")
        x, out, argmax, (out_h, out_w) = self.cache
        n, h, w, c = x.shape
        f = out.shape[3]
        kh, kw = self.conv.kernel_size
        dtype = out.dtype
        grad_out = np.ascontiguousarray(grad_out, dtype)
        grad_in = np.empty_like(x) if input_grad else None
        phases = self._phase_weights(dtype) if input_grad else []

        def run(part: slice) -> tuple[np.ndarray]:
            g = activation_grad(grad_out[part], out[part], self.activation,
                                scratch("g_act", out[part].shape, dtype))
            if self.pool is not None:
                g = self._pool_backward(g, argmax[part], out_h, out_w)
            g_rows = g.reshape(-1, f)
            cols = self._im2col(x, part, out_h, out_w)  # recomputed: cheaper than keeping it
            # (F, K + 1): the weight gradient, and in the column of ones' place the bias's.
            # np.dot, not matmul: matmul keeps the GIL when its output is small (500 or fewer
            # elements, e.g. 16 x 26), which stalls the other threads (fused.sum_along).
            if cols.flags.f_contiguous:  # channel-major im2col, cols = (K, M).T: (K, M) @ (M, F)
                grads = np.dot(cols.T, g_rows).T  # with both operands row-major is 10-15%
            else:                                 # faster for K = 25-27 (measured)
                grads = np.dot(g_rows.T, cols)
            if grad_in is not None:
                self._input_grad(g, phases, grad_in[part], (h, w))
            return (grads,)

        def finish(results: list) -> None:
            (grads,) = sum_in_order(results)
            self.conv.grads["weight"] += grads[:, :-1].reshape(f, kh, kw, c).transpose(0, 3, 1, 2)
            self.conv.grads["bias"] += grads[:, -1]

        chunks = self._chunks(n, out_h * out_w * kh * kw * c * x.itemsize)
        return Stage(run, chunks, grad_in, finish)


class DenseBlock:
    """Linear -> optional ReLU/Sigmoid, the activation applied in place on the GEMM output.

    forward x: (N, in) -> (N, out); the GEMMs split over threads (parallel_matmul).
    """

    channels_last = False

    def __init__(self, linear: Linear, activation: Layer | None = None) -> None:
        self.linear = linear
        self.activation = activation_name(activation)
        self.cache: tuple | None = None

    def __repr__(self) -> str:
        name = f"linear {self.linear.in_features}->{self.linear.out_features}"
        return name + (f"+{self.activation}" if self.activation else "")

    def forward(self, x: np.ndarray, train: bool = True) -> np.ndarray:
        """x: (N, in) -> (N, out)."""
        lin = self.linear
        if x.ndim != 2 or x.shape[1] != lin.in_features:
            raise ValueError(f"Linear expects (N, {lin.in_features}), got {x.shape}")
        out = parallel_matmul(x, lin.params["weight"].T)
        out += lin.params["bias"]
        activate_(out, self.activation)
        if train:
            self.cache = (x, out)
        return out

    def backward(self, grad_out: np.ndarray, input_grad: bool = True) -> np.ndarray | None:
        """grad_out: (N, out) -> grad_in: (N, in), or None if not ``input_grad``."""
        if self.cache is None:
            raise RuntimeError("DenseBlock.backward called before a training forward")
        x, out = self.cache
        lin = self.linear
        g = activation_grad(grad_out, out, self.activation, np.empty_like(out))
        lin.grads["weight"] += parallel_matmul(g.T, x)
        lin.grads["bias"] += g.sum(axis=0)
        return parallel_matmul(g, lin.params["weight"]) if input_grad else None
