"""Build a timm classifier with a new head and load pretrained weights (hub or local file)."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from .config import ModelConfig
from .errors import ConfigError, WeightsError


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """A timm model with a `num_classes` head; weights as cfg.pretrained says."""
    source = cfg.pretrained.strip()
    if source.lower() == "imagenet":
        model = _from_hub(cfg.name, num_classes)
    else:
        try:
            model = timm.create_model(cfg.name, pretrained=False, num_classes=num_classes, **_init_kwargs(cfg))
        except RuntimeError as exc:  # timm's "Unknown model" error
            raise WeightsError(f"model.name '{cfg.name}': {exc}") from None
        except TypeError as exc:  # a model class without the init option
            raise ConfigError(
                f"config key 'model.zero_init_last': model '{cfg.name}' does not take it ({exc})"
            ) from None
        if source.lower() != "none":
            load_backbone(model, source)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _init_kwargs(cfg: ModelConfig) -> dict[str, bool]:
    """timm's ResNet-family constructors take `zero_init_last` (default True); other models do not,
    so it is passed only when the config departs from timm's default."""
    return {} if cfg.zero_init_last else {"zero_init_last": False}


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection to the hub, so that a machine without network fails in seconds.

    Without it huggingface_hub retries each file for about 50 s before giving up.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    # The endpoint's own host and port: HF_ENDPOINT may name a mirror such as http://mirror:8080.
    endpoint = urlparse(constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _from_hub(name: str, num_classes: int) -> nn.Module:
    if not timm.is_model(name):
        raise WeightsError(f"model.name '{name}' is not a timm model")
    from huggingface_hub import constants

    offline_before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = not _hub_reachable()  # unreachable: the local cache only
    try:
        # timm drops the 1000-class head of the downloaded weights when num_classes differs.
        return timm.create_model(name, pretrained=True, num_classes=num_classes)
    except Exception as exc:  # hub, network and cache errors come in many types
        reason = str(exc).splitlines()[0][:160] if str(exc) else exc.__class__.__name__
        raise WeightsError(
            f"cannot load ImageNet weights for '{name}' (offline and not cached? {reason}); "
            f"download them where there is network, or pass a local file with model.pretrained=/path/to/weights.pth, "
            f"or train from scratch with model.pretrained=none"
        ) from None
    finally:
        constants.HF_HUB_OFFLINE = offline_before


def _state_dict_from(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Accept a plain state dict or the common wrappers ({'state_dict': ...}, {'model': ...})."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_backbone(model: nn.Module, path: str | Path) -> None:
    """Load a torchvision- or timm-format state dict; the head is kept only if its shape fits.

    torchvision's and timm's ResNets share parameter names, so one mapping serves both.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"model.pretrained: weights file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read weights file {path} ({exc.__class__.__name__})") from None
    state = _state_dict_from(obj, path)
    own = model.state_dict()
    head = model.pretrained_cfg.get("classifier", "fc")
    head_keys = {k for k in own if k == head or k.startswith(head + ".")}
    for key in head_keys:
        if key in state and state[key].shape != own[key].shape:
            del state[key]  # a head for other classes: keep the freshly initialised one
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    if mismatched:
        k = mismatched[0]
        raise WeightsError(
            f"{path}: '{k}' has shape {tuple(state[k].shape)}, the model expects {tuple(own[k].shape)} (is model.name right?)"
        )
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in head_keys]
    if missing or result.unexpected_keys:
        raise WeightsError(
            f"{path} does not fit model '{model.pretrained_cfg.get('architecture', '?')}': "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})"
        )
