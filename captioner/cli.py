"""`captioner` command line: parses arguments and calls the library, nothing more."""
from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .data import DataError, load_coco, load_karpathy, load_sequences
from .distributed import PeerFailure, first_line, from_env, lost_peer
from .decoding import whole_number
from .errors import CaptionerError, UsageError
from .features import FeatureCache
from .images import DEFAULT_MAX_PIXELS, ImageError, list_images
from .paths import check_output_dir, check_output_file
from .training import TrainOptions

GLOB_CHARS = set("*?[")


def _err(msg: str) -> None:
    print(f"captioner: {msg}", file=sys.stderr, flush=True)


def _stdin_paths() -> list[str]:
    """`-`: paths read from standard input, one per line (as `find ... | captioner caption -`)."""
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("`-` reads image paths from standard input, one per line, but nothing is piped in")
    return [line.rstrip("\r\n") for line in sys.stdin if line.strip()]


def expand_inputs(args: Sequence[str]) -> tuple[list[str], list[ImageError]]:
    """Files, folders (their images, sorted), globs and `-` (paths on standard input) -> image
    paths, plus what matched nothing."""
    paths: list[str] = []
    problems: list[ImageError] = []
    if list(args).count("-") > 1:
        raise UsageError("`-` (paths from standard input) can be given once")
    args = [x for a in args for x in (_stdin_paths() if a == "-" else [a])]
    for a in args:
        p = Path(a)
        if p.is_dir():
            found = list_images(p)
            paths += [str(f) for f in found]
            if not found:
                problems.append(ImageError(a, "folder holds no image files"))
        elif not p.exists() and GLOB_CHARS & set(a):
            matches = sorted(m for m in glob.glob(a, recursive=True) if Path(m).is_file())
            paths += matches
            if not matches:
                problems.append(ImageError(a, "no files match this pattern"))
        else:
            paths.append(a)
    return paths, problems


def cmd_caption(args: argparse.Namespace) -> int:
    from .api import Captioner

    given = [bool(args.inputs), bool(args.sequence), bool(args.sequence_dir)]
    if sum(given) != 1:
        raise UsageError("give images to caption one by one, or --sequence FRAME..., or --sequence-dir DIR "
                         "(one of them)")
    if args.attention_map:
        check_output_dir(args.attention_map)
    model = Captioner.load(args.model, device=args.device)
    model.max_pixels = args.max_pixels
    _decoding(model, args)  # nonsense refused before any image is read
    if args.attention_map and model.decoder.attends_over != "regions":
        raise UsageError(f"--attention-map needs a single-image model trained with --decoder attention "
                         f"(this one has --decoder {model.config['decoder']}"
                         f"{' on sequences' if model.is_sequence_model else ''})")
    decode_opts = dict(beam_size=args.beam_size, n_best=args.n_best, max_len=args.max_len, min_len=args.min_len,
                       length_alpha=args.length_penalty, no_repeat_ngram=args.no_repeat_ngram,
                       batch_size=args.batch_size)  # None: the model's decoding defaults
    if not args.inputs:
        return _caption_sequences(model, args, decode_opts)
    paths, failed = expand_inputs(args.inputs)
    maps_written: set[str] = set()
    inputs = {Path(p).resolve() for p in paths} if args.attention_map else set()  # never overwritten by a map
    for e in failed:
        _err(str(e))
    n_failed = len(failed)
    for path, r in zip(paths, model.generate(paths, **decode_opts)):
        if isinstance(r, ImageError):
            _err(str(r))
            n_failed += 1
            continue
        if args.attention_map:
            try:
                _write_attention_map(model, path, r[0], Path(args.attention_map), maps_written, inputs)
            except (OSError, ValueError) as e:  # the caption still gets printed below
                _err(f"{path}: attention map not written ({e})")
                n_failed += 1
        _print_caption(args, {"path": path}, path, r)
    return 1 if n_failed else 0


def _print_caption(args: argparse.Namespace, key: dict, label: str, nbest: list) -> None:
    if args.json:
        line = json.dumps(key | {"caption": nbest[0].text,
                                 "nbest": [{"caption": c.text, "score": round(c.score, 4)} for c in nbest]},
                          ensure_ascii=False)
    else:
        line = f"{label}\t{nbest[0].text}"
    print(line, flush=True)


def _caption_sequences(model, args: argparse.Namespace, decode_opts: dict) -> int:
    """--sequence F1 F2 ... (order as given) or --sequence-dir DIR ... (each folder's images in
    natural order): one caption per sequence."""
    if args.sequence:
        sequences, labels = [args.sequence], [" ".join(args.sequence)]
    else:
        sequences, labels = [], []
        for d in args.sequence_dir:
            if not Path(d).is_dir():
                _err(f"{d}: not a folder")
                continue
            frames = [str(f) for f in list_images(d)]
            if not frames:
                _err(f"{d}: folder holds no image files")
                continue
            sequences.append(frames)
            labels.append(d)
    n_failed = len(args.sequence_dir or []) - len(sequences) if not args.sequence else 0
    for frames, label, r in zip(sequences, labels, model.generate_sequences(sequences, **decode_opts)):
        if isinstance(r, ImageError):
            _err(f"{r} (sequence not captioned)")
            n_failed += 1
            continue
        _print_caption(args, {"sequence": frames}, label, r)
    return 1 if n_failed else 0


def _write_attention_map(model, path: str, caption, out_dir: Path, taken: set[str], model_inputs: set[Path]) -> None:
    from .images import load_image
    from .viz import attention_map

    name = Path(path).stem
    while name in taken:  # two inputs with the same file name: keep both maps
        name += "_"
    taken.add(name)
    target = out_dir / f"{name}.png"
    if target.exists() and target.resolve() in model_inputs:
        raise ValueError(f"{target} is one of the images being captioned; it is not overwritten")
    words = list(caption.words)
    attention_map(load_image(path, model.max_pixels), words, caption.attention_grid().numpy(), model.preprocess,
                  target)


def _load_corpus(annotations: str | None, images: str | None, karpathy_json: str | None, images_root: str | None,
                 split: str, skip_missing: bool, sequences: str | None = None, skip_bad: bool = False):
    """A COCO caption file + image folder, a sequence file + image folder, or a Karpathy split file's
    split(s); None if none is given."""
    if karpathy_json:
        return load_karpathy(karpathy_json, images_root or Path(karpathy_json).parent, split, skip_missing)
    for path, loader in ((annotations, load_coco), (sequences, load_sequences)):
        if path:
            if not images:
                raise DataError(f"{path}: give the folder of its images too")
            return loader(path, images, skip_missing, skip_bad)
    return None


def _corpora(args: argparse.Namespace):
    train = _load_corpus(args.train_annotations, args.train_images, args.karpathy_json, args.images_root,
                         args.split, args.skip_missing, args.train_sequences, args.skip_bad)
    if train is None:
        raise DataError("give --train-annotations (or --train-sequences) and --train-images, or --karpathy-json")
    val = _load_corpus(args.val_annotations, args.val_images, args.karpathy_json if args.val_split else None,
                       args.images_root, args.val_split, args.skip_missing, args.val_sequences, args.skip_bad)
    for name, c in (("train", train), ("val", val)):
        if c is not None and c.skipped_missing and not args.quiet:
            _err(f"{name}: skipped {c.skipped_missing} missing image(s) from {c.source}")
    return train, val


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .api import Captioner
    from .evaluation import caption_corpus, references, score, write_results

    if args.results:
        check_output_file(args.results)  # before captioning everything, not after
        for given in (args.annotations, args.sequences, args.karpathy_json):
            if given and Path(given).exists() and Path(args.results).exists() and Path(given).samefile(args.results):
                raise UsageError(f"{args.results}: is the reference file itself; --results would overwrite it")
    corpus = _load_corpus(args.annotations, args.images, args.karpathy_json, args.images_root, args.split,
                          args.skip_missing, args.sequences, args.skip_bad)
    if corpus is None:
        raise DataError("give --annotations (or --sequences) and --images, or --karpathy-json and --split")
    model = Captioner.load(args.model, device=args.device)
    cache = None if args.no_cache else FeatureCache(model.encoder, args.cache_dir, model.device)
    results, failed = caption_corpus(model, corpus, batch_size=args.batch_size, quiet=args.quiet, cache=cache,
                                     **_decoding(model, args))
    for e in failed:
        _err(str(e))
    if args.results:
        write_results(args.results, results)
    report = {"model": str(args.model or "bundled"), "decoding": _decoding(model, args), "failed": len(failed),
              "skipped_missing": corpus.skipped_missing, **score(references(corpus), results)}
    print(json.dumps(report))
    return 1 if failed else 0


def _decoding(model, args: argparse.Namespace) -> dict:
    """The model's decoding defaults, with what the command line set; checked before any work."""
    return model.resolve_decoding(n_best=getattr(args, "n_best", 1), beam_size=args.beam_size, max_len=args.max_len,
                                  min_len=args.min_len, length_alpha=args.length_penalty,
                                  no_repeat_ngram=args.no_repeat_ngram)


def cmd_extract_features(args: argparse.Namespace) -> int:
    from .device import resolve_device
    from .encoders import build_encoder

    corpus = _load_corpus(args.annotations, args.images, args.karpathy_json, args.images_root, args.split,
                          args.skip_missing, args.sequences)
    found, problems = expand_inputs(args.inputs)
    paths = (corpus.paths if corpus is not None else []) + [Path(p) for p in found]
    if not paths and not problems:
        raise DataError("nothing to extract: give image files/folders/globs, --annotations with --images, "
                        "or --karpathy-json")
    cache = FeatureCache(build_encoder(args.encoder), args.cache_dir, resolve_device(args.device))
    failed = problems + cache.fill(paths, batch_size=args.batch_size, num_workers=args.num_workers, quiet=args.quiet)
    for e in failed:
        _err(str(e))
    if not args.quiet:
        print(f"{len(paths) - len(failed)} image(s) cached in {cache.dir}", file=sys.stderr)
    return 1 if failed else 0


def cmd_validate_data(args: argparse.Namespace) -> int:
    """Check a dataset without training: the file's entries, then every image it names."""
    from tqdm import tqdm

    from .data import DataProblems, check_file
    from .images import load_image
    from .vocab import tokenize

    if not args.file or not args.images:
        raise DataError("give --annotations or --sequences, and --images")
    files, groups, captions, problems = check_file(args.file)
    for key, caps in captions.items():
        for c in caps:
            if not tokenize(c):
                problems.add("captions with no words (only punctuation or symbols)", f"{key!r}: {c[:30]!r}")
    used = {i for ids in groups.values() for i in ids} if groups is not None else set(files)
    images = DataProblems(args.file)
    for iid in tqdm(sorted(used, key=str), desc="images", unit="img", disable=args.quiet, leave=False):
        try:
            load_image(Path(args.images) / files[iid], args.max_pixels)
        except ImageError as e:
            images.add("missing image files" if e.reason == "no such file" else "unreadable images",
                       f"{files[iid]} ({e.reason})")
    what = f"{len(groups)} sequences, " if groups is not None else ""
    print(f"{args.file}: {len(files)} images, {what}{sum(len(c) for c in captions.values())} captions")
    bad = problems.lines(args.show) + images.lines(args.show)
    if not captions:
        bad.insert(0, "no captioned images: nothing to train or evaluate on")
    for line in bad:
        print(f"  {line}")
    print("problems found: fix them (training refuses malformed entries and missing or unreadable images unless "
          "given --skip-bad / --skip-missing)" if bad else "ok")
    return 1 if bad else 0


def cmd_score(args: argparse.Namespace) -> int:
    from .evaluation import check_coverage, load_references, read_results, score

    refs, files = load_references(args.annotations, args.karpathy_json, args.split)
    results = read_results(args.results, files)
    check_coverage(refs, results, str(args.results), args.allow_partial)
    report = {"results": str(args.results), "reference_images": len(refs), **score(refs, results)}  # + "images" scored
    print(json.dumps(report))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .viz import plot_training

    out = plot_training(args.run_dir, args.out)
    print(out)
    return 0


def _stop_on_sigterm() -> None:
    """SIGTERM (a scheduler or `kill`) stops training like Ctrl-C: weights saved, clean exit."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def cmd_train(args: argparse.Namespace) -> int:
    from . import distributed
    from .training import CLI_UNSET, Trainer, TrainingInterrupted

    _stop_on_sigterm()
    dist = distributed.init(args.device)  # under torchrun: join the job (gloo on CPUs, nccl on GPUs)
    train, val = _corpora(args)
    opts = TrainOptions(**{k: getattr(args, k) for k in TrainOptions.__dataclass_fields__ if k not in CLI_UNSET})
    trainer = Trainer(train, val, args.out, opts, device=args.device, resume=args.resume, quiet=args.quiet,
                      use_cache=not args.no_cache, cache_dir=args.cache_dir, skip_bad=args.skip_bad, dist=dist,
                      compile=args.compile, overwrite=args.overwrite, given=args.given)
    if trainer.finished:
        _err(trainer.finished)
        return 0
    try:
        best = trainer.fit()
    except TrainingInterrupted as e:  # rank 0 saved the weights; the others have nothing to add
        _err(_rank() + (str(e) if dist.is_main else "interrupted"))
        return 130
    distributed.shutdown()
    if not args.quiet and dist.is_main:
        print(f"best checkpoint: {best}", file=sys.stderr)
    return 0


def _cache_args(group) -> None:
    group.add_argument("--cache-dir", help="feature cache folder (default: $CAPTIONER_CACHE_DIR or ~/.cache/captioner)")
    group.add_argument("--no-cache", action="store_true", help="compute encoder features in memory, cache nothing")


def _decoding_args(parser) -> None:
    """Decoding options; left unset, each comes from the model (its measured best, or the defaults)."""
    parser.add_argument("--beam-size", type=int, help="beam width, 1 = greedy (default: the model's, else 5)")
    parser.add_argument("--max-len", type=int, help="most words per caption (default: the model's, else 20)")
    parser.add_argument("--min-len", type=int, help="fewest words per caption (default: the model's, else 1)")
    parser.add_argument("--length-penalty", type=float, help="GNMT alpha, 0 = off (default: the model's, else 0)")
    parser.add_argument("--no-repeat-ngram", type=int,
                        help="forbid repeating n-grams of this size, 0 = off (default: the model's, else 0)")


class _Parser(argparse.ArgumentParser):
    """Sub-command parsers: help shows defaults."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpWithDefaults)
        super().__init__(*args, **kwargs)


class _HelpWithDefaults(argparse.HelpFormatter):
    """Each flag's help ends with its default, unless it has none or the text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="captioner", description="Describe images in English; train captioning models.",
                                formatter_class=_HelpWithDefaults)
    p.add_argument("--version", action="version", version=f"captioner {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("caption", help="caption images, folders or glob patterns")
    c.add_argument("inputs", nargs="*",
                   help="image files, folders of images, glob patterns, or - to read paths from standard input, "
                        "one per line (one caption each)")
    c.add_argument("--sequence", nargs="+", metavar="FRAME",
                   help="one caption for these images as an ordered sequence (album, burst, video frames)")
    c.add_argument("--sequence-dir", action="append", metavar="DIR",
                   help="one caption for a folder's images as a sequence, in natural file-name order "
                        "(frame2 before frame10); repeat for several")
    c.add_argument("--model", help="checkpoint (default: the bundled model)")
    _decoding_args(c)
    c.add_argument("--n-best", type=int, default=1, help="how many captions per image or sequence (with --json)")
    c.add_argument("--batch-size", type=int, default=32, help="images encoded and beam-searched together")
    c.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="refuse images declaring more pixels than this, before decoding them (decompression bombs)")
    c.add_argument("--json", action="store_true", help="one JSON object per line, with the n-best list")
    c.add_argument("--attention-map", metavar="OUT_DIR",
                   help="attention models: write OUT_DIR/<image>.png, the image and each word's attention")
    c.add_argument("--device", default="auto", help="auto | cpu | cuda")
    c.set_defaults(func=cmd_caption)

    d = TrainOptions()
    t = sub.add_parser("train", help="train a captioning model on a COCO-style or Karpathy-split dataset",
                       allow_abbrev=False)  # (flags are matched whole: --resume checks which ones were given)
    g = t.add_argument_group("data")
    g.add_argument("--train-annotations", help="COCO caption JSON for training")
    g.add_argument("--train-images", help="folder of the training images")
    g.add_argument("--val-annotations", help="COCO caption JSON for validation")
    g.add_argument("--val-images", help="folder of the validation images")
    g.add_argument("--train-sequences", help="sequence caption JSON for training (images, sequences, annotations)")
    g.add_argument("--val-sequences", help="sequence caption JSON for validation")
    g.add_argument("--karpathy-json", help="Karpathy split file (dataset_coco.json / dataset_flickr8k.json)")
    g.add_argument("--images-root", help="with --karpathy-json: folder the filepaths are relative to")
    g.add_argument("--split", default="train", help="with --karpathy-json: training split(s), e.g. train,restval")
    g.add_argument("--val-split", default="val", help="with --karpathy-json: validation split ('' for none)")
    g.add_argument("--skip-missing", action="store_true", help="leave out missing image files instead of failing")
    g.add_argument("--skip-bad", action="store_true",
                   help="leave out malformed entries and unreadable images (see validate-data) instead of refusing")
    g.add_argument("--min-word-count", type=int, default=d.min_word_count,
                   help="words seen fewer times in the training captions become <unk>")
    g.add_argument("--max-caption-len", type=int, default=d.max_caption_len, help="longer captions are cut")
    m = t.add_argument_group("model")
    m.add_argument("--encoder", default=d.encoder, help="efficientnet_lite0 | resnet50|101|152 | timm/<name>")
    m.add_argument("--decoder", default=d.decoder, choices=["attention", "lstm"],
                   help="attention (default): Show-Attend-Tell on the 7x7 grid; lstm: Show-and-Tell on the "
                        "pooled vector (faster, weaker)")
    m.add_argument("--embed-size", type=int, default=d.embed_size, help="word embedding size")
    m.add_argument("--hidden-size", type=int, default=d.hidden_size, help="LSTM hidden size")
    m.add_argument("--num-layers", type=int, default=d.num_layers, help="stacked LSTM layers")
    m.add_argument("--dropout", type=float, default=d.dropout, help="dropout probability, in [0, 1)")
    m.add_argument("--attention-size", type=int, default=d.attention_size, help="attention decoder: hidden size")
    m.add_argument("--alpha-c", type=float, default=d.alpha_c,
                   help="attention decoder: doubly stochastic attention regularisation weight")
    m.add_argument("--temporal", default=d.temporal, choices=["auto", "gru", "lstm", "none"],
                   help="sequences: RNN over the frames (auto: gru for sequence data, none for images); "
                        "none: a single-image decoder on the mean frame (order-blind)")
    m.add_argument("--temporal-size", type=int, default=d.temporal_size, help="hidden size of the temporal RNN")
    m.add_argument("--keypoints", type=int, default=d.keypoints,
                   help="temporal model: soft keypoints per frame (where things are)")
    m.add_argument("--tbptt", type=int, default=d.tbptt, metavar="K",
                   help="truncated BPTT: back-propagate through at most K frames (0: all frames)")
    m.add_argument("--fine-tune-encoder", type=int, default=d.fine_tune_encoder, metavar="N",
                   help="train the last N encoder blocks too (0: frozen encoder)")
    m.add_argument("--encoder-lr", type=float, default=d.encoder_lr,
                   help="learning rate of the fine-tuned encoder blocks")
    o = t.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=d.epochs,
                   help="passes over the training set (on --resume: the total, which may grow)")
    o.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="per process: under torchrun the global batch is this x the number of processes")
    o.add_argument("--lr", type=float, default=d.lr, help="learning rate of the decoder")
    o.add_argument("--optimizer", default=d.optimizer, choices=["adam", "sgd", "momentum"],
                   help="momentum: SGD with --momentum")
    o.add_argument("--momentum", type=float, default=d.momentum, help="with --optimizer momentum")
    o.add_argument("--weight-decay", type=float, default=d.weight_decay, help="L2 penalty on the weights")
    o.add_argument("--lr-schedule", default=d.lr_schedule, choices=["plateau", "constant", "step", "cosine"],
                   help="plateau: decay when the selection metric stalls")
    o.add_argument("--lr-patience", type=int, default=d.lr_patience, help="plateau: epochs without improvement")
    o.add_argument("--lr-step-epochs", type=int, default=d.lr_step_epochs, help="step: decay every N epochs")
    o.add_argument("--lr-gamma", type=float, default=d.lr_gamma, help="step / plateau: decay factor")
    o.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max global gradient norm")
    o.add_argument("--init-from", default=d.init_from, metavar="CKPT",
                   help="start from this checkpoint's weights, vocabulary and architecture (e.g. for --self-critical)")
    o.add_argument("--self-critical", action="store_true",
                   help="self-critical sequence training: sampled captions rewarded by their CIDEr-D")
    o.add_argument("--scst-samples", type=int, default=d.scst_samples, help="self-critical: captions sampled per image")
    o.add_argument("--scst-max-len", type=int, default=d.scst_max_len, help="self-critical: most words per sample")
    o.add_argument("--seed", type=int, default=d.seed,
                   help="initial weights, data order and dropout; the same seed trains the same model")
    o.add_argument("--num-workers", type=int, default=d.num_workers, help="image-decoding worker processes")
    o.add_argument("--amp", default=d.amp, choices=["auto", "off", "bf16", "fp16"],
                   help="mixed precision; auto: bf16 on CUDA, off on CPU (bf16 also pays on CPUs with AVX512-BF16/AMX)")
    v = t.add_argument_group("validation and model selection")
    v.add_argument("--select-metric", default=d.select_metric,
                   help="what best.pt follows: CIDEr-D, BLEU-4, METEOR, ROUGE-L, BLEU-1..3 or val_loss")
    v.add_argument("--patience", type=int, default=d.patience,
                   help="stop after N epochs without improvement of the selection metric (0: never)")
    v.add_argument("--val-beam-size", type=int, default=d.val_beam_size, help="beam for val captions (1: greedy)")
    r = t.add_argument_group("run")
    r.add_argument("--out", required=True, help="run folder: last.pt, best.pt, metrics.jsonl")
    r.add_argument("--resume", action="store_true", help="continue from OUT/last.pt (its settings; --epochs may grow)")
    r.add_argument("--overwrite", action="store_true",
                   help="start afresh in an OUT that holds another run (its checkpoints and log are deleted)")
    r.add_argument("--device", default="auto",
                   help="auto | cpu | cuda (under torchrun each process takes the GPU of its LOCAL_RANK)")
    r.add_argument("--compile", action="store_true",
                   help="torch.compile the decoder's per-word step and a fine-tuned encoder (pays on GPUs; "
                        "the first batches are slow while it compiles)")
    r.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    _cache_args(r)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="caption a dataset's images and score them (BLEU, METEOR, ROUGE-L, CIDEr-D)")
    e.add_argument("--model", help="checkpoint (default: the bundled model)")
    e.add_argument("--annotations", help="COCO caption JSON with the references")
    e.add_argument("--sequences", help="sequence caption JSON instead of --annotations (one caption per sequence)")
    e.add_argument("--images", help="folder of its images")
    e.add_argument("--karpathy-json", help="Karpathy split file instead of --annotations/--images")
    e.add_argument("--images-root", help="with --karpathy-json: folder the filepaths are relative to")
    e.add_argument("--split", default="val", help="with --karpathy-json: which split(s)")
    e.add_argument("--skip-missing", action="store_true", help="leave out missing image files instead of failing")
    e.add_argument("--skip-bad", action="store_true", help="leave out malformed entries instead of refusing the file")
    _decoding_args(e)
    e.add_argument("--batch-size", type=int, default=32, help="images encoded and beam-searched together")
    e.add_argument("--results", help="also write the captions here, in the COCO results format")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    _cache_args(e)
    e.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("extract-features", help="fill the feature cache ahead of training or evaluation")
    x.add_argument("inputs", nargs="*", help="image files, folders or glob patterns")
    x.add_argument("--annotations", help="COCO caption JSON: its images")
    x.add_argument("--sequences", help="sequence caption JSON: the frames of its sequences")
    x.add_argument("--images", help="with --annotations or --sequences: the folder its file_names are in")
    x.add_argument("--karpathy-json", help="Karpathy split file: the images of --split")
    x.add_argument("--images-root", help="with --karpathy-json: folder the filepaths are relative to")
    x.add_argument("--split", default="train,restval,val,test", help="with --karpathy-json: which split(s)")
    x.add_argument("--skip-missing", action="store_true", help="leave out missing image files instead of failing")
    x.add_argument("--encoder", default=TrainOptions().encoder,
                   help="the encoder the features are for (as train --encoder)")
    x.add_argument("--batch-size", type=int, default=32, help="images encoded together")
    x.add_argument("--num-workers", type=int, default=1, help="image-decoding worker processes")
    x.add_argument("--device", default="auto", help="auto | cpu | cuda")
    x.add_argument("--quiet", action="store_true", help="no progress bar")
    x.add_argument("--cache-dir", help="feature cache folder (default: $CAPTIONER_CACHE_DIR or ~/.cache/captioner)")
    x.set_defaults(func=cmd_extract_features)

    vd = sub.add_parser("validate-data", help="check a dataset file and its images, and say what is wrong")
    src = vd.add_mutually_exclusive_group(required=True)
    src.add_argument("--annotations", dest="file", help="COCO caption JSON")
    src.add_argument("--sequences", dest="file", help="sequence caption JSON")
    vd.add_argument("--images", required=True, help="folder its file_names are in")
    vd.add_argument("--show", type=int, default=5, help="offenders shown per kind of problem")
    vd.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                    help="report images declaring more pixels than this (decompression bombs), as caption refuses them")
    vd.add_argument("--quiet", action="store_true", help="no progress bar")
    vd.set_defaults(func=cmd_validate_data)

    s = sub.add_parser("score", help="score an existing COCO results file against reference captions")
    s.add_argument("--results", required=True,
                   help='captions: a COCO results file [{"image_id": ..., "caption": ...}, ...], or JSON Lines '
                        '(`captioner caption --json` output: each "path" is matched to a reference file name)')
    refs = s.add_mutually_exclusive_group(required=True)
    refs.add_argument("--annotations", help="COCO caption (or sequence) JSON with the references")
    refs.add_argument("--karpathy-json", help="Karpathy split file with the references (of --split)")
    s.add_argument("--split", default="val", help="with --karpathy-json: which split(s)")
    s.add_argument("--allow-partial", action="store_true",
                   help="score results that cover only some of the reference images (refused otherwise)")
    s.set_defaults(func=cmd_score)

    pl = sub.add_parser("plot", help="draw a run's training curves (loss, val metrics) as a PNG")
    pl.add_argument("run_dir", help="a run folder with metrics.jsonl")
    pl.add_argument("--out", help="PNG path (default: RUN_DIR/curves.png)")
    pl.set_defaults(func=cmd_plot)
    return p


def _rank() -> str:
    """'rank R of W: ' inside a multi-process job (torchrun), so every line says who failed."""
    rank, world, _ = from_env()
    return f"rank {rank} of {world}: " if world > 1 else ""


#: whole-number flags shared by several commands, and their least sensible value
_CLI_COUNTS = {"batch_size": 1, "num_workers": 0, "max_pixels": 1, "show": 0, "n_best": 1}


def _given(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> set[str]:
    """The options the command line set (not left at their defaults): --resume and --init-from
    refuse those that contradict the run, instead of silently dropping them."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    given = set()
    for action in sub._actions:
        if any(tok == o or tok.startswith(o + "=") for o in action.option_strings for tok in argv):
            given.add(action.dest)
    return given


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.given = _given(parser, args, argv)
    try:
        for dest, low in _CLI_COUNTS.items():  # sizes and counts of every command, checked at the door
            if getattr(args, dest, None) is not None:
                whole_number(getattr(args, dest), low, "--" + dest.replace("_", "-"))
        return args.func(args)
    except CaptionerError as e:  # the user's to fix: one line
        _err(_rank() + str(e))
        return 2
    except KeyboardInterrupt:
        _err(_rank() + "interrupted")
        return 130
    except BrokenPipeError:  # the reader went away (`captioner caption DIR | head -1`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's last flush has nowhere to fail
        return 141  # 128 + SIGPIPE: what a shell reports for a tool stopped by a closed pipe
    except Exception as e:
        if not _rank():  # a bug: the traceback is the useful report
            traceback.print_exc()
            _err(f"internal error ({type(e).__name__}: {first_line(e)}): this is a bug in captioner, "
                 "please report it with the traceback above")
            return 1
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun stops the other workers: let this one finish exiting
        if isinstance(e, PeerFailure):  # its message names this rank
            _err(str(e))
        elif lost_peer(e):
            _err(f"{_rank()}stopped: another process of this job went away ({first_line(e)}); "
                 "its own message above says why")
        else:
            traceback.print_exc()
            _err(f"{_rank()}failed: {type(e).__name__}: {first_line(e)}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
