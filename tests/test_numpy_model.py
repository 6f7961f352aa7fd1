"""The Sequential network, its fused conv+ReLU+pool path, npz weights and the default CNN."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from labctl.worker.numpy_cnn import (
    AdaMax,
    Conv2D,
    Flatten,
    Linear,
    MaxPool2D,
    ReLU,
    Sequential,
    blocks,
    build_default_cnn,
    softmax_cross_entropy,
)
from labctl.worker.numpy_cnn import model as model_module
from labctl.worker.numpy_cnn.fused import CHANNEL_MAJOR_MAX_CHANNELS, ConvReLUPool
from labctl.worker.numpy_cnn.parallel import (
    Stage,
    batch_chunks,
    parallel_map,
    parallel_matmul,
    run_stages,
    split_evenly,
)


def layer_summary(model: Sequential) -> list[tuple[str, tuple]]:
    return [(type(layer).__name__, tuple(layer.params["weight"].shape))
            for layer in model.layers if layer.params]


@pytest.mark.parametrize("channels, size, classes, expected", [
    (1, 8, 10, [("Conv2D", (16, 1, 3, 3)), ("Conv2D", (32, 16, 3, 3)),
                ("Linear", (128, 32 * 2 * 2)), ("Linear", (10, 128))]),
    (1, 28, 10, [("Conv2D", (16, 1, 3, 3)), ("Conv2D", (32, 16, 3, 3)),
                 ("Linear", (128, 32 * 7 * 7)), ("Linear", (10, 128))]),
    (3, 64, 196, [("Conv2D", (32, 3, 3, 3)), ("Conv2D", (64, 32, 3, 3)),
                  ("Linear", (256, 64 * 16 * 16)), ("Linear", (196, 256))]),
])
def test_default_cnn_is_sized_to_the_input(channels, size, classes, expected):
    model = build_default_cnn(channels, size, classes, np.random.default_rng(0))
    assert layer_summary(model) == expected
    assert [type(layer).__name__ for layer in model.layers] == [
        "Conv2D", "ReLU", "MaxPool2D", "Conv2D", "ReLU", "MaxPool2D", "Flatten", "Linear",
        "ReLU", "Linear"]
    assert all(isinstance(step, ConvReLUPool) for step in model.steps[:2])
    x = np.zeros((2, channels, size, size), np.float32)
    assert model.forward(x).shape == (2, classes)


def test_default_cnn_is_seeded_by_the_generator():
    a = build_default_cnn(1, 8, 10, np.random.default_rng(3)).state_dict()
    b = build_default_cnn(1, 8, 10, np.random.default_rng(3)).state_dict()
    c = build_default_cnn(1, 8, 10, np.random.default_rng(4)).state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["0.weight"], c["0.weight"])
    assert list(a) == ["0.weight", "0.bias", "3.weight", "3.bias", "7.weight", "7.bias",
                       "9.weight", "9.bias"]


def twin_models(build, dtype=np.float64):
    """The same network twice, fused and layer by layer, with equal weights."""
    fused, plain = build(True), build(False)
    for model in (fused, plain):
        for layer in model.layers:
            layer.astype(dtype)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def run_both(fused: Sequential, plain: Sequential, x: np.ndarray, seed: int = 0):
    labels = np.random.default_rng(seed).integers(0, 3, len(x))
    results = []
    for model in (fused, plain):
        model.zero_grad()
        loss, grad = softmax_cross_entropy(model.forward(x), labels)
        results.append((model.forward(x), model.backward(grad), loss))
    return results


def assert_same_grads(a: Sequential, b: Sequential, rtol: float) -> None:
    for la, lb in zip(a.layers, b.layers, strict=True):
        for key in la.grads:
            np.testing.assert_allclose(la.grads[key], lb.grads[key], rtol=rtol, atol=rtol * 1e-3)


def custom_net(fuse: bool, channels: int, kernel: int, padding: int, size: tuple[int, int],
               width: int = 6, seed: int = 0) -> Sequential:
    """conv-relu-pool twice then linear. Blocks with one input channel build im2col
    transposed, so ``width`` (the second block's input) picks the second block's variant."""
    rng = np.random.default_rng(seed)
    h, w = size
    h1, w1 = (h + 2 * padding - kernel + 1) // 2, (w + 2 * padding - kernel + 1) // 2
    h2, w2 = (h1 + 2 * padding - kernel + 1) // 2, (w1 + 2 * padding - kernel + 1) // 2
    layers = [Conv2D(channels, width, kernel, padding=padding, rng=rng), ReLU(), MaxPool2D(2),
              Conv2D(width, 5, kernel, padding=padding, rng=rng), ReLU(), MaxPool2D(2),
              Flatten(), Linear(5 * h2 * w2, 3, rng=rng)]
    for layer in layers:
        if "bias" in layer.params:
            layer.params["bias"][:] = rng.standard_normal(layer.params["bias"].shape) * 0.1
    return Sequential(*layers, fuse=fuse)


@pytest.mark.parametrize("channels, kernel, padding, size, batch, width", [
    (1, 3, 1, (8, 8), 2, 6),
    (3, 3, 1, (13, 11), 3, 6),     # odd, non-square: the pools drop a row / column
    (2, 5, 2, (12, 9), 1, 6),      # kernel 5, batch 1
    (2, 1, 0, (9, 10), 5, 6),      # kernel 1
    (1, 3, 0, (14, 14), 2, 6),     # no padding
    (2, 3, 1, (8, 8), 23, 6),      # more images than chunks
    (6, 3, 1, (10, 10), 3, 1),     # row-major first block, channel-major second
])
def test_fused_path_equals_per_layer_path(channels, kernel, padding, size, batch, width):
    fused, plain = twin_models(lambda f: custom_net(f, channels, kernel, padding, size, width))
    modes = [s.channel_major for s in fused.steps if isinstance(s, ConvReLUPool)]
    assert modes == [channels <= CHANNEL_MAJOR_MAX_CHANNELS, width <= CHANNEL_MAJOR_MAX_CHANNELS]
    assert not any(isinstance(s, ConvReLUPool) for s in plain.steps)
    x = np.random.default_rng(1).standard_normal((batch, channels, *size))
    (out_f, dx_f, loss_f), (out_p, dx_p, loss_p) = run_both(fused, plain, x)
    np.testing.assert_allclose(out_f, out_p, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx_f, dx_p, rtol=1e-10, atol=1e-13)
    assert_same_grads(fused, plain, rtol=1e-10)


def test_reused_buffers_do_not_leak_between_paddings():
    """A 14x14 input without padding and a 12x12 one with padding 1 share padded shapes;
    the second must still see zero borders."""
    for padding, size in [(0, (14, 14)), (1, (12, 12)), (0, (14, 14))]:
        fused, plain = twin_models(lambda f, p=padding, s=size: custom_net(f, 2, 3, p, s))
        x = np.random.default_rng(padding).standard_normal((4, 2, *size))
        (out_f, dx_f, _), (out_p, dx_p, _) = run_both(fused, plain, x)
        np.testing.assert_allclose(out_f, out_p, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dx_f, dx_p, rtol=1e-10, atol=1e-13)


def test_fused_path_breaks_max_pool_ties_like_torch():
    """Blank regions (MNIST's background) make every pixel of a pooling window equal; the
    gradient must go to the first one, in both paths, or the input gradients differ."""
    fused, plain = twin_models(lambda f: custom_net(f, 1, 3, 1, (12, 12)))
    x = np.zeros((3, 1, 12, 12))
    x[:, :, 4:8, 3:9] = np.random.default_rng(2).standard_normal((3, 1, 4, 6))
    (_, dx_f, _), (_, dx_p, _) = run_both(fused, plain, x)
    np.testing.assert_allclose(dx_f, dx_p, rtol=1e-10, atol=1e-13)
    assert_same_grads(fused, plain, rtol=1e-10)


def test_fused_default_cnn_equals_per_layer_in_float32():
    fused, plain = twin_models(lambda f: build_default_cnn(1, 28, 10, np.random.default_rng(0),
                                                           fuse=f), dtype=np.float32)
    x = np.random.default_rng(3).standard_normal((64, 1, 28, 28)).astype(np.float32)
    (out_f, _, _), (out_p, _, _) = run_both(fused, plain, x)
    assert out_f.dtype == np.float32
    np.testing.assert_allclose(out_f, out_p, rtol=1e-4, atol=1e-5)
    assert_same_grads(fused, plain, rtol=1e-3)


def test_backward_can_skip_the_input_gradient_with_the_same_parameter_gradients():
    model = build_default_cnn(1, 8, 3, np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((4, 1, 8, 8)).astype(np.float32)
    _, grad = softmax_cross_entropy(model.forward(x), np.array([0, 1, 2, 0]))
    model.backward(grad)
    full = {k: layer.grads[p].copy() for k, layer, p in
            ((f"{i}.{p}", layer, p) for i, layer in enumerate(model.layers) for p in layer.grads)}
    model.zero_grad()
    assert model.backward(grad, input_grad=False) is None
    for i, layer in enumerate(model.layers):
        for p in layer.grads:
            np.testing.assert_array_equal(layer.grads[p], full[f"{i}.{p}"])


def test_matches_the_same_network_in_torch():
    model = build_default_cnn(1, 28, 10, np.random.default_rng(0))
    reference = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(),
                              nn.Linear(128, 10))
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 16)
    logits = model.forward(x)
    loss, grad = softmax_cross_entropy(logits, y)
    model.backward(grad, input_grad=False)
    expected = F.cross_entropy(reference(torch.from_numpy(x)), torch.from_numpy(y))
    expected.backward()
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    for (name, param), layer_grad in zip(
            reference.named_parameters(),
            (layer.grads[k] for layer in model.layers for k in layer.grads), strict=True):
        np.testing.assert_allclose(layer_grad, param.grad.numpy(), rtol=1e-3, atol=1e-5,
                                   err_msg=name)


def test_save_and_load_round_trip(tmp_path):
    model = build_default_cnn(3, 16, 5, np.random.default_rng(0))
    path = tmp_path / "weights"  # no .npz suffix: the file is written exactly there
    model.save(path)
    assert path.exists() and not (tmp_path / "weights.npz").exists()
    other = build_default_cnn(3, 16, 5, np.random.default_rng(1))
    other.load(path)
    x = np.random.default_rng(2).standard_normal((2, 3, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(other.forward(x), model.forward(x))
    with np.load(path) as data:
        assert sorted(data.files) == sorted(model.state_dict())
    with pytest.raises(ValueError, match="shape"):
        build_default_cnn(3, 16, 6).load(path)
    with pytest.raises(KeyError):
        Sequential(Linear(3, 2)).load(path)


def test_training_steps_are_reproducible_and_learn():
    rng = np.random.default_rng(0)
    prototypes = rng.standard_normal((3, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 96)
    x = prototypes[y] + 0.3 * rng.standard_normal((96, 1, 8, 8)).astype(np.float32)

    def train() -> tuple[list[float], dict]:
        model = build_default_cnn(1, 8, 3, np.random.default_rng(5))
        optimizer = AdaMax(model.layers)
        losses = []
        for step in range(30):
            batch = slice(32 * (step % 3), 32 * (step % 3 + 1))
            optimizer.zero_grad()
            loss, grad = softmax_cross_entropy(model.forward(x[batch]), y[batch])
            model.backward(grad, input_grad=False)
            optimizer.step()
            losses.append(loss)
        return losses, model.state_dict()

    losses, weights = train()
    again, weights_again = train()
    assert losses == again
    assert all(np.array_equal(weights[k], weights_again[k]) for k in weights)
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])


def test_evaluation_forward_keeps_the_training_cache():
    """forward(train=False) in between must not disturb the pending backward."""
    model = build_default_cnn(1, 8, 3, np.random.default_rng(0))
    rng = np.random.default_rng(1)
    x, other = rng.standard_normal((2, 4, 1, 8, 8)).astype(np.float32)
    _, grad = softmax_cross_entropy(model.forward(x), np.array([0, 1, 2, 0]))
    model.backward(grad, input_grad=False)
    expected = model.layers[0].grads["weight"].copy()
    model.zero_grad()
    model.forward(x)
    model.forward(other[:3], train=False)
    model.backward(grad, input_grad=False)
    np.testing.assert_array_equal(model.layers[0].grads["weight"], expected)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_parallel_map_raises_an_items_error_after_every_thread_stops(monkeypatch):
    """A failing item is re-raised in the caller; the other threads stop claiming items,
    and the pool still serves the next call."""
    monkeypatch.setenv("LABCTL_NUMPY_THREADS", "2")
    done = []

    def work(i: int) -> int:
        if i == 3:
            raise ValueError("item 3")
        done.append(i)
        return i

    with pytest.raises(ValueError, match="item 3"):
        parallel_map(work, range(200))
    assert len(done) < 199
    assert parallel_map(lambda i: i * i, range(50)) == [i * i for i in range(50)]


def test_parallel_map_runs_items_on_the_caller_and_the_pool(monkeypatch):
    monkeypatch.setenv("LABCTL_NUMPY_THREADS", "2")

    def where(i: int) -> str:
        time.sleep(0.002)  # lets the other thread claim items meanwhile
        return threading.current_thread().name

    names = set(parallel_map(where, range(20)))
    assert threading.current_thread().name in names
    assert len(names) == 2


def test_threads_work_in_a_forked_child():
    """The thread pool made before a fork must not be reused by the child (it would hang)."""
    model = build_default_cnn(1, 28, 10, np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((64, 1, 28, 28)).astype(np.float32)
    expected = model.forward(x)  # starts the parent's pool
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        got = pool.apply_async(model.forward, (x,)).get(timeout=60)
    np.testing.assert_array_equal(got, expected)


def test_parallel_helpers_keep_order_nest_and_split_gemms_exactly(monkeypatch):
    monkeypatch.setenv("LABCTL_NUMPY_THREADS", "3")
    assert split_evenly(10, 3) == [slice(0, 3), slice(3, 6), slice(6, 10)]
    assert split_evenly(2, 5) == [slice(0, 1), slice(1, 2)]
    # Chunks of about the asked size, as many as a multiple of the threads.
    assert batch_chunks(64, 13) == split_evenly(64, 6)
    assert batch_chunks(64, 0) == split_evenly(64, 64)  # an image bigger than a chunk
    assert batch_chunks(2, 100) == split_evenly(2, 2)
    # A pool thread asking for the pool again runs inline instead of deadlocking.
    nested = parallel_map(lambda i: sum(parallel_map(lambda j: i * j, range(4))), range(6))
    assert nested == [6 * i for i in range(6)]
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((64, 300)), rng.standard_normal((300, 257))
    np.testing.assert_allclose(parallel_matmul(a, b), a @ b, rtol=1e-12)
    np.testing.assert_array_equal(parallel_matmul(a, b), parallel_matmul(a, b))


@pytest.mark.parametrize("threads", ["1", "2", "3"])
def test_run_stages_starts_a_chunk_once_the_images_it_reads_are_done(monkeypatch, threads):
    """Each stage's chunk waits for the previous stage's chunks covering its images, and
    no longer: with stage 0's last chunk slow, stage 1 starts before stage 0 ends. Each
    ``finish`` gets its stage's results in chunk order."""
    monkeypatch.setenv("LABCTL_NUMPY_THREADS", threads)
    images = 24
    chunkings = [split_evenly(images, 6), split_evenly(images, 4), split_evenly(images, 3)]
    lock = threading.Lock()
    done = [set() for _ in chunkings]
    log: list[tuple[str, int, int]] = []
    finished: dict[int, list] = {}

    def stage(s: int) -> Stage:
        def run(part: slice) -> tuple[int, int]:
            with lock:
                if s:
                    assert set(range(part.stop)) <= done[s - 1], (s, part)
                log.append(("start", s, part.start))
            if s == 0 and part.stop == images:
                time.sleep(0.05)
            with lock:
                done[s].update(range(part.start, part.stop))
                log.append(("end", s, part.start))
            return part.start, part.stop

        return Stage(run, chunkings[s], None, lambda results: finished.setdefault(s, results))

    run_stages([stage(s) for s in range(3)])
    assert all(d == set(range(images)) for d in done)
    assert finished == {s: [(c.start, c.stop) for c in chunkings[s]] for s in range(3)}
    if threads != "1":
        last_of_stage_0 = log.index(("end", 0, chunkings[0][-1].start))
        assert ("start", 1, 0) in log[:last_of_stage_0]


def test_run_stages_reraises_a_chunks_error_and_the_pool_serves_the_next_call(monkeypatch):
    monkeypatch.setenv("LABCTL_NUMPY_THREADS", "2")
    ran, finished = [], []

    def run(part: slice) -> None:
        if part.start == 3:
            raise ValueError("chunk 3")
        ran.append(part.start)
        time.sleep(0.001)

    stages = [Stage(run, split_evenly(200, 200), None, finished.append),
              Stage(lambda part: None, split_evenly(200, 2), None, finished.append)]
    with pytest.raises(ValueError, match="chunk 3"):
        run_stages(stages)
    assert len(ran) < 199 and not finished
    results = []
    run_stages([Stage(lambda part: part.start, split_evenly(8, 4), None, results.append)])
    assert results == [[0, 2, 4, 6]]


@pytest.mark.parametrize("threads", ["1", "2"])
def test_pipelined_blocks_give_the_same_step_as_blocks_run_one_by_one(monkeypatch, threads):
    """Small chunks make every block run several, so the pipeline interleaves them; the
    outputs and gradients are bitwise those of each block running its own chunk loop."""
    monkeypatch.setenv("LABCTL_NUMPY_THREADS", threads)
    monkeypatch.setattr(blocks, "CHUNK_BYTES", 16 * 1024)
    rng = np.random.default_rng(0)
    layers = [Conv2D(3, 8, 3, padding=1, rng=rng), ReLU(), MaxPool2D(2),
              Conv2D(8, 8, 3, stride=2, padding=1, rng=rng), ReLU(),
              Conv2D(8, 4, 3, padding=1, rng=rng), ReLU(), Flatten(),
              Linear(4 * 4 * 4, 5, rng=rng)]
    net = Sequential(*layers)
    assert [type(s).__name__ for s in net.steps[:3]] == ["ConvReLUPool", "ConvBlock", "ConvBlock"]
    x = np.random.default_rng(1).standard_normal((37, 3, 16, 16)).astype(np.float32)
    labels = np.arange(37) % 5
    runs = []
    for pipelined in (True, False):
        monkeypatch.setattr(model_module, "PIPELINE_BLOCKS", pipelined)
        assert len(net._runs(range(len(net.steps)))[0]) == (3 if pipelined else 1)
        net.zero_grad()
        out = net.forward(x)
        _, grad = softmax_cross_entropy(out, labels)
        grad_in = net.backward(grad)
        runs.append((out, grad_in, [g.copy() for layer in layers for g in layer.grads.values()]))
    (out_p, dx_p, grads_p), (out_b, dx_b, grads_b) = runs
    np.testing.assert_array_equal(out_p, out_b)
    np.testing.assert_array_equal(dx_p, dx_b)
    for got, want in zip(grads_p, grads_b, strict=True):
        np.testing.assert_array_equal(got, want)
