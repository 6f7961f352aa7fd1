"""Our ResNet50 against torchvision's: same names, same shapes, same outputs."""

from __future__ import annotations

import random

import pytest
import torch
import torchvision

from labctl.worker.engine import DataError
from labctl.worker.resnet import Bottleneck, load_init_weights, resnet50

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _outputs_equal(ours: torch.nn.Module, theirs: torch.nn.Module, x: torch.Tensor) -> None:
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_torchvision_state_dict_loads_strictly_and_gives_the_same_outputs(seed):
    # Sizes and class counts are drawn per seed so odd shapes (not multiples of 32) are covered.
    rng = random.Random(seed)
    size, num_classes = rng.randint(33, 80), rng.choice([2, 7, 196])
    torch.manual_seed(seed)
    theirs = torchvision.models.resnet50(num_classes=num_classes)
    # Train-mode steps give the BatchNorm buffers non-default values, so they are compared too.
    theirs.train()
    with torch.no_grad():
        theirs(torch.randn(4, 3, size, size))
    ours = resnet50(num_classes=num_classes)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    _outputs_equal(ours, theirs, torch.randn(2, 3, size, size))


def test_architecture_is_resnet50_v1_5():
    model = resnet50()
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3, model.layer4)] \
        == [3, 4, 6, 3]
    assert Bottleneck.expansion == 4
    # v1.5: the stride sits on the 3x3 convolution of the first block of a stage.
    first = model.layer2[0]
    assert first.conv1.stride == (1, 1) and first.conv2.stride == (2, 2)
    assert first.downsample[0].stride == (2, 2)
    assert sum(p.numel() for p in model.parameters()) == 25_557_032  # torchvision's count


def test_kaiming_fan_out_init():
    torch.manual_seed(0)
    conv = resnet50(num_classes=10).layer3[0].conv2  # 256 -> 256, 3x3
    expected_std = (2.0 / (conv.out_channels * 9)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.05)


def test_zero_init_residual_zeroes_the_last_norm_of_every_block():
    model = resnet50(num_classes=10, zero_init_residual=True)
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 16
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for b in blocks)
    assert all(torch.count_nonzero(b.bn2.weight) == b.bn2.weight.numel() for b in blocks)
    default = resnet50(num_classes=10)
    assert torch.all(default.layer1[0].bn3.weight == 1)


def test_init_weights_replaces_the_classifier_when_the_class_count_differs(tmp_path):
    torch.manual_seed(0)
    source = torchvision.models.resnet50(num_classes=10)
    path = tmp_path / "pretrained.pth"
    # Wrapped the way torchvision's reference scripts save, with DDP's key prefix.
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()},
                "epoch": 3}, path)

    model = resnet50(num_classes=3)
    fresh_fc = model.fc.weight.detach().clone()
    assert load_init_weights(model, path, num_classes=3) is True
    assert model.fc.weight.shape == (3, 2048)
    assert torch.equal(model.fc.weight, fresh_fc)
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer4[2].bn3.running_var, source.layer4[2].bn3.running_var)


def test_init_weights_keeps_the_classifier_when_the_class_count_matches(tmp_path):
    source = torchvision.models.resnet50(num_classes=5)
    path = tmp_path / "bare.pt"
    torch.save(source.state_dict(), path)
    model = resnet50(num_classes=5)
    assert load_init_weights(model, path, num_classes=5) is False
    _outputs_equal(model, source, torch.randn(2, 3, 40, 40))


def test_init_weights_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="expected init weights checkpoint at .*missing.pt"):
        load_init_weights(resnet50(num_classes=2), tmp_path / "missing.pt", num_classes=2)
    other = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), other)
    with pytest.raises(DataError, match="does not fit resnet50"):
        load_init_weights(resnet50(num_classes=2), other, num_classes=2)
