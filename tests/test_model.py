import hashlib
import http.server
import os
import subprocess
import sys
import time

import pytest
import safetensors.torch
import timm
import torch
import torchvision
from conftest import local_server

from flowers_dist.config import ConfigError, ModelConfig
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


def test_zero_init_last_sets_the_last_batchnorm_of_every_residual_block():
    def last_bn_weights(model):
        return [
            block.bn2.weight for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for block in layer
        ]

    timm_default = build_model(ModelConfig(name="resnet18", pretrained="none"), 5)
    assert all(torch.count_nonzero(w) == 0 for w in last_bn_weights(timm_default))
    plain = build_model(ModelConfig(name="resnet18", pretrained="none", zero_init_last=False), 5)
    assert all(torch.equal(w, torch.ones_like(w)) for w in last_bn_weights(plain))
    assert all(torch.equal(b.bn1.weight, torch.ones_like(b.bn1.weight)) for b in plain.layer1)
    with pytest.raises(ConfigError, match="model.zero_init_last"):
        build_model(ModelConfig(name="test_vit", pretrained="none", zero_init_last=False), 5)


class _HubFiles(http.server.BaseHTTPRequestHandler):
    """The two requests huggingface_hub makes for one file: HEAD (commit, ETag, size), then GET."""

    timeout = 30  # a stuck client connection cannot hold a server thread forever
    files: dict[str, bytes] = {}
    seen: list[str] = []

    def _headers(self) -> bytes | None:
        self.seen.append(f"{self.command} {self.path}")
        blob = self.files.get(self.path)
        if blob is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        self.send_response(200)
        self.send_header("X-Repo-Commit", "0" * 40)
        self.send_header("ETag", f'"{hashlib.sha256(blob).hexdigest()}"')
        self.send_header("Content-Length", str(len(blob)))
        self.end_headers()
        return blob

    def do_HEAD(self):
        self._headers()

    def do_GET(self):
        blob = self._headers()
        if blob is not None:
            self.wfile.write(blob)

    def log_message(self, *args):
        pass


@pytest.mark.e2e
def test_imagenet_weights_download_through_the_hub_client_and_then_come_from_the_cache(tmp_path):
    # The real download path (timm -> huggingface_hub) against a local server standing in for the
    # hub, named by HF_ENDPOINT as a mirror would be; then the same build with the server gone.
    reference = timm.create_model("resnet18", num_classes=1000)
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "w.safetensors"
    )
    torch.save(reference.state_dict(), tmp_path / "reference.pt")
    _HubFiles.files = {
        "/timm/resnet18.tv_in1k/resolve/main/model.safetensors": (tmp_path / "w.safetensors").read_bytes()
    }
    _HubFiles.seen = []
    code = (
        f"import torch; from flowers_dist.config import ModelConfig; from flowers_dist.model import build_model; "
        f"m = build_model(ModelConfig(name='resnet18.tv_in1k', pretrained='imagenet'), 5); "
        f"torch.save(m.state_dict(), {str(tmp_path / 'built.pt')!r})"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_HOME"] = str(tmp_path / "hf")
    reference = torch.load(tmp_path / "reference.pt")
    with local_server(_HubFiles) as url:
        env["HF_ENDPOINT"] = url
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "GET /timm/resnet18.tv_in1k/resolve/main/model.safetensors" in _HubFiles.seen
    _check_backbone_equal(_built(tmp_path / "built.pt"), reference)
    (tmp_path / "built.pt").unlink()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]  # the server is gone: the cache serves it
    _check_backbone_equal(_built(tmp_path / "built.pt"), reference)


def _built(path):
    model = build_model(ModelConfig(name="resnet18.tv_in1k", pretrained="none"), 5)
    model.load_state_dict(torch.load(path))
    return model
