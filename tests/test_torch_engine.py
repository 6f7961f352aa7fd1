"""The torch engine: schedule, resume determinism, divergence, OOM advice, checkpoints, and
a short digits run that has to learn something. CPU only, except the ``cuda`` tests."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from labctl.shared.artifacts import ArtifactStore
from labctl.shared.spec import build_spec
from labctl.worker.engine import JobCancelled, TrainingDiverged
from labctl.worker.runner import Reporter, run_job
from labctl.worker.torch_engine import CHECKPOINT_FORMAT, TorchEngine
from labctl.worker.torch_optim import lr_factor

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

#: Tiny synthetic jobs: 16 training images (2 batches) at 32x32, under a second an epoch.
TINY = dict(model="resnet50", dataset="synthetic", image_size=32, limit_train=16,
            limit_test=16, batch_size=8, epochs=3, warmup_epochs=1, num_workers=0, device="cpu")


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def spec_of(**overrides):
    return build_spec({**TINY, **overrides})


def test_lr_schedule_warms_up_linearly_then_follows_cosine():
    factors = [lr_factor(e, epochs=5, warmup_epochs=2, schedule="cosine") for e in range(5)]
    assert factors[:2] == pytest.approx([1 / 3, 2 / 3])
    assert factors[2] == pytest.approx(1.0)
    assert factors[3] == pytest.approx(0.5 * (1 + math.cos(math.pi / 3)))
    assert all(a > b for a, b in zip(factors[2:], factors[3:], strict=False))
    assert [lr_factor(e, 4, 0, "constant") for e in range(4)] == [1.0] * 4


def test_engine_steps_the_schedule_per_epoch():
    engine = TorchEngine(spec_of(lr=1e-3, epochs=4, warmup_epochs=1, limit_train=8))
    seen = []
    for epoch in range(1, 5):
        seen.append(engine.current_lr())
        engine.train_one_epoch(epoch, lambda b, n: None)
    expected = [1e-3 * lr_factor(e, 4, 1, "cosine") for e in range(4)]
    assert seen == pytest.approx(expected)
    kind = type(engine.optimizer).__name__
    assert kind == "Adamax" and engine.optimizer.defaults["betas"] == (0.9, 0.999)


class CancelAt(Reporter):
    def __init__(self, epoch: int, batch: int):
        self.at = (epoch, batch)

    def on_batch(self, epoch, batch, num_batches):
        if (epoch, batch) == self.at:
            raise JobCancelled


def test_resumed_run_ends_with_the_same_metrics_as_an_uninterrupted_one(tmp_path):
    store = ArtifactStore(tmp_path)
    spec = spec_of()
    straight = run_job(spec, "20260101-000000-000001", store)
    assert straight.state == "succeeded", straight.error

    interrupted_id = "20260101-000000-000002"
    # Cancelled in the middle of epoch 3: the checkpoint holds epoch 2, and the partial
    # epoch's batches must not leak into the resumed run.
    first = run_job(spec, interrupted_id, store, CancelAt(epoch=3, batch=1))
    assert first.state == "cancelled"
    assert [r["epoch"] for r in store.job(interrupted_id).read_metrics()] == [1, 2]
    # A new engine in the same job folder; its checkpoint kept to be looked at below.
    resumed = run_job(spec, interrupted_id, store, keep_checkpoint=True)
    assert resumed.state == "succeeded", resumed.error
    # By default a succeeded job drops its checkpoint and keeps its final weights.
    straight_folder = store.job("20260101-000000-000001").path
    assert (straight_folder / "model.pt").exists()
    assert not (straight_folder / "checkpoint.pt").exists()

    def numbers(job_id):
        return [{k: v for k, v in row.items() if k not in ("epoch_seconds", "images_per_second")}
                for row in store.job(job_id).read_metrics()]

    assert numbers(interrupted_id) == numbers("20260101-000000-000001")
    assert "test_top5_accuracy" in numbers(interrupted_id)[-1]  # synthetic has 10 classes

    folder = store.job(interrupted_id).path
    checkpoint = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert checkpoint["format"] == CHECKPOINT_FORMAT and checkpoint["epoch"] == 3
    assert checkpoint["spec"]["model"] == "resnet50"
    assert {"torch", "cuda", "numpy", "python", "loader"} <= set(checkpoint["rng"])
    assert {"model", "optimizer", "scheduler", "scaler"} <= set(checkpoint)
    # The final weights are a bare torchvision-format state_dict.
    torchvision.models.resnet50(num_classes=10).load_state_dict(
        torch.load(folder / "model.pt", weights_only=True), strict=True)


def test_init_weights_start_from_a_previous_jobs_weights(tmp_path):
    first = TorchEngine(spec_of(limit_train=8, seed=1))
    first.save_weights(tmp_path / "model.pt")
    second = TorchEngine(spec_of(limit_train=8, seed=2, init_weights=str(tmp_path / "model.pt")))
    assert torch.equal(first.model.layer3[1].conv2.weight, second.model.layer3[1].conv2.weight)
    assert torch.equal(first.model.fc.weight, second.model.fc.weight)


def test_checkpoint_resumes_under_another_optimizer_kernel(tmp_path):
    # As when a job checkpointed on the CPU resumes on a GPU with fused Adam (fused Adam
    # also runs on the CPU, which lets this path be tested here).
    spec = spec_of(optimizer="adam", limit_train=8)
    plain = TorchEngine(spec)
    plain.train_one_epoch(1, lambda b, n: None)
    plain.save_checkpoint(tmp_path / "checkpoint.pt", 1, spec.model_dump(mode="json"))
    fused = TorchEngine(spec)
    fused.optimizer = torch.optim.Adam(fused.model.parameters(), lr=1e-3, fused=True)
    fused.scheduler = type(fused.scheduler)(fused.optimizer, fused.scheduler.lr_lambdas[0])
    assert fused.load_checkpoint(tmp_path / "checkpoint.pt") == 1
    assert fused.optimizer.param_groups[0]["fused"] is True
    assert fused.current_lr() == pytest.approx(plain.current_lr())
    assert math.isfinite(fused.train_one_epoch(2, lambda b, n: None).loss)


def test_non_finite_loss_raises_training_diverged():
    engine = TorchEngine(spec_of(limit_train=16, epochs=1, warmup_epochs=0))
    with torch.no_grad():
        engine.model.fc.bias.fill_(float("nan"))
    with pytest.raises(TrainingDiverged) as caught:
        engine.train_one_epoch(1, lambda b, n: None)
    assert (caught.value.epoch, caught.value.batch) == (1, 1)


def test_cuda_out_of_memory_names_a_smaller_batch_size(monkeypatch):
    engine = TorchEngine(spec_of(limit_train=8, batch_size=64))

    class OutOfMemory(torch.nn.Module):
        def forward(self, images):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine, "runner_model", OutOfMemory())
    with pytest.raises(RuntimeError, match=r"out of memory.*--batch-size 32"):
        engine.evaluate()


def test_short_digits_run_learns_well_above_chance():
    # 192 images upsampled to 32x32, 36 AdaMax steps: about 0.6 accuracy here, chance is 0.1.
    engine = TorchEngine(build_spec(dict(
        model="resnet50", dataset="digits", image_size=32, limit_train=192, limit_test=200,
        batch_size=16, epochs=3, lr_schedule="constant", num_workers=0, device="cpu")))
    assert engine.num_classes == 10 and engine.train_size == 192
    losses = [engine.train_one_epoch(epoch, lambda b, n: None).loss for epoch in (1, 2, 3)]
    result = engine.evaluate()
    assert losses[-1] < losses[0]
    assert (result.y_true == result.y_pred).mean() > 0.3
    assert result.top5 is not None and result.top5 > 0.6


@pytest.mark.cuda
@cuda
def test_cuda_bf16_channels_last_run_resumes(tmp_path):
    store = ArtifactStore(tmp_path)
    spec = spec_of(device="cuda", amp=True, channels_last=True, epochs=2, limit_train=256,
                   limit_test=64, batch_size=32, num_workers=2)
    outcome = run_job(spec, "20260101-000000-00000c", store, keep_checkpoint=True)
    assert outcome.state == "succeeded", outcome.error
    engine = TorchEngine(spec)
    assert engine.optimizer.param_groups[0].get("foreach") or \
        engine.optimizer.param_groups[0].get("fused")
    assert engine.load_checkpoint(tmp_path / "20260101-000000-00000c" / "checkpoint.pt") == 2
    result = engine.evaluate()
    assert len(result.y_pred) == 64 and math.isfinite(result.loss)


@pytest.mark.cuda
@cuda
def test_checkpoint_from_the_cpu_resumes_on_cuda_with_fused_adam(tmp_path):
    cpu = TorchEngine(spec_of(optimizer="adam", limit_train=16))
    cpu.train_one_epoch(1, lambda b, n: None)
    cpu.save_checkpoint(tmp_path / "checkpoint.pt", 1, {})
    gpu = TorchEngine(spec_of(optimizer="adam", limit_train=16, device="cuda", amp=True))
    assert gpu.load_checkpoint(tmp_path / "checkpoint.pt") == 1
    assert gpu.optimizer.param_groups[0]["fused"] is True
    assert math.isfinite(gpu.train_one_epoch(2, lambda b, n: None).loss)
    assert math.isfinite(gpu.evaluate().loss)


@pytest.mark.cuda
@cuda
def test_cuda_fused_adam_and_matching_outputs_with_torchvision():
    engine = TorchEngine(spec_of(device="cuda", optimizer="adam", limit_train=64))
    assert engine.optimizer.param_groups[0]["fused"] is True
    assert engine.train_one_epoch(1, lambda b, n: None).images == 64
    theirs = torchvision.models.resnet50(num_classes=10).cuda().eval()
    theirs.load_state_dict(engine.model.state_dict())
    engine.model.eval()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(engine.model(x), theirs(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [8, 32, 33, 63, 64, 65, 96])
def test_last_feature_map_side_matches_the_model(size):
    from labctl.worker.resnet import resnet50
    from labctl.worker.torch_engine import last_feature_map_side

    model = resnet50(num_classes=2).eval()
    trunk = torch.nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool,
                                model.layer1, model.layer2, model.layer3, model.layer4)
    with torch.no_grad():
        side = trunk(torch.zeros(1, 3, size, size)).shape[-1]
    assert last_feature_map_side(size) == side


@pytest.mark.parametrize(("overrides", "message"), [
    ({"batch_size": 1}, "batch_size: ResNet50 at image_size 32 cannot train on batches of one"),
    ({"limit_train": 1}, "the training split has one image"),
])
def test_a_batch_of_one_at_a_small_size_is_refused_before_training(tmp_path, overrides,
                                                                   message):
    # BatchNorm would fail in the first step with torch's own words, as a crash (exit 1).
    spec = build_spec({"model": "resnet50", "dataset": "digits", "image_size": 32,
                       "epochs": 1, "num_workers": 0, "limit_test": 8, **overrides})
    outcome = run_job(spec, "20260101-000000-0000b1", ArtifactStore(tmp_path))
    assert outcome.state == "failed" and outcome.failure == "input"
    assert outcome.error.startswith(message)
    assert "\n" not in outcome.error
