import time

import pytest
import timm
import torch
import torchvision

from flowers_dist.config import ModelConfig
from flowers_dist.model import WeightsError, build_model


def _check_backbone_equal(model, source_state):
    own = model.state_dict()
    for key, tensor in source_state.items():
        if key.startswith("fc."):
            continue
        assert torch.equal(own[key], tensor), key
    assert own["fc.weight"].shape == (5, 512) and own["fc.bias"].shape == (5,)


def test_timm_format_file_loads_with_head_replaced(tmp_path):
    source = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "timm.pth")
    model = build_model(ModelConfig(name="resnet18", pretrained=str(tmp_path / "timm.pth")), 5)
    _check_backbone_equal(model, source.state_dict())


def test_torchvision_format_wrapped_file_loads(tmp_path):
    source = torchvision.models.resnet18(weights=None)
    # The common wrappers: a checkpoint dict and DDP's "module." prefix.
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "tv.pth")
    model = build_model(ModelConfig(name="resnet18.tv_in1k", pretrained=str(tmp_path / "tv.pth")), 5)
    _check_backbone_equal(model, source.state_dict())


def test_weights_of_another_architecture_are_refused(tmp_path):
    torch.save(timm.create_model("resnet34", pretrained=False).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(WeightsError, match="does not fit|expects"):
        build_model(ModelConfig(name="resnet18", pretrained=str(tmp_path / "r34.pth")), 5)
    with pytest.raises(WeightsError, match="does not exist"):
        build_model(ModelConfig(name="resnet18", pretrained=str(tmp_path / "missing.pth")), 5)


def test_offline_without_cache_fails_fast_and_says_how_to_pass_a_file(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.perf_counter()
    with pytest.raises(WeightsError, match=r"model\.pretrained=/path/to/weights"):
        build_model(ModelConfig(name="resnet18.tv_in1k", pretrained="imagenet"), 5)
    assert time.perf_counter() - start < 30


def test_channels_last_and_unknown_model():
    model = build_model(ModelConfig(name="resnet18", pretrained="none", channels_last=True), 5)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(WeightsError, match="resnet999"):
        build_model(ModelConfig(name="resnet999", pretrained="none"), 5)
