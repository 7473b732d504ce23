"""Backbones by name: a registry of torchvision ResNets returning pooled features."""
from __future__ import annotations

from pathlib import Path
from typing import get_args

import torch
import torchvision
from torch import nn

from src.config import BackboneName
from src.safe_load import CheckpointError, safe_torch_load, unusual_layout


class ModelError(RuntimeError):
    """A model that cannot be built as configured; one-line message."""


# The torchvision networks the config schema offers. torchvision builds the network; we only drop its
# fc, whose input width is the feature width.
BACKBONES = get_args(BackboneName)


def _imagenet_weights(name: str):
    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # urllib, ssl, hash and file errors all mean "not available here"
        raise ModelError(
            f"model.pretrained: cannot get torchvision's ImageNet weights for {name} ({type(exc).__name__}); "
            f"offline, copy {weights.url} into {torch.hub.get_dir()}/checkpoints/, or set model.pretrained "
            "to a local weights file, or to false for random initialisation") from None


def _local_weights(path: Path) -> dict:
    if path.is_dir():
        raise ModelError(f"model.pretrained: {path} is a folder, not a weights file")
    try:
        state = safe_torch_load(path)
    except CheckpointError as exc:
        raise ModelError(f"model.pretrained: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) and not unusual_layout(v)
                                              for v in state.values()):
        raise ModelError(f"model.pretrained: {path} does not hold a state dict of dense tensors")
    return state


def _load_backbone_weights(net: nn.Module, state: dict, name: str) -> None:
    """Load everything but the ImageNet classifier; refuse weights of another shape or network."""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = {k: v.shape for k, v in net.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    misshapen = sorted(k for k in expected.keys() & state.keys() if state[k].shape != expected[k])
    if missing or unexpected or misshapen:
        raise ModelError(f"model.pretrained: weights do not fit {name}: {len(missing)} missing, "
                         f"{len(unexpected)} unexpected, {len(misshapen)} of another shape "
                         f"(e.g. {(missing + unexpected + misshapen)[:2]})")
    net.load_state_dict(state, strict=False)


def create_backbone(name: str, pretrained: bool | Path = False) -> tuple[nn.Module, int]:
    """A torchvision network with its classifier removed, and its feature width."""
    if name not in BACKBONES:
        raise ModelError(f"model.backbone: unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    net = torchvision.models.get_model(name, weights=None)
    if pretrained is True:
        state = _imagenet_weights(name)
    elif pretrained:
        state = _local_weights(Path(pretrained))
    else:
        state = None
    if state is not None:
        _load_backbone_weights(net, state, name)
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feature_dim
