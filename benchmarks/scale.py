"""Training's data path at COCO's size: what grows with the data set, measured at 10k, 40k and 118k photos.

    python benchmarks/scale.py [--sizes 10000,40000,118287] [--steps 200] [--val 5000] [--work DIR]

Builds a COCO-size caption set (COCO 2017 train: 118,287 photos, 591,753 captions; the photos are
hard links to three tiny JPEGs, the captions real ones from the shared data sets with one word
changed each, so they keep real captions' shapes and are almost all distinct) and a 5000-photo val
set, then a feature cache of the real shapes (Lite0: a 7x7x1280 fp16 grid and a 1280 pooled vector
per photo, 127 KB) filled with synthetic features through the project's own cache code
(`FeatureCache.put`), so its index and files are the ones training reads. At each size, each in a
fresh process (so each peak RSS is its own):

- load: the annotations read and checked, the training vocabulary built (s, peak RSS);
- open: the feature cache's index read and the corpus' rows found (s);
- train (Show-and-Tell "lstm" and "attention"): start-up (annotations -> the first step done, val
  set and features included, as `captioner train` does it), steps per second over the next steps,
  RSS after them (anonymous memory and mapped files apart);
- ddp: the same on 2 processes (torchrun, gloo on the CPU), per-process RSS;
- val (largest size only): one validation pass over the val photos with the attention model after
  its steps: greedy captions, then the metrics (BLEU, METEOR, ROUGE-L, CIDEr-D).

The cache needs ~127 KB per photo on disk (15 GB at 118k; the work folder is removed at the end
unless --keep). --json prints the results as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = REPO.parent / "shared" / "data"
COCO_PHOTOS, COCO_CAPTIONS = 118_287, 591_753
BASE_FILES = ("coco_dev/captions.json", "coco_256/captions.json", "flickr8k/captions_train.json")
FALLBACK = [  # when the shared data sets are absent (e.g. a CI machine without them)
    "A man riding a wave on top of a surfboard.",
    "a dog runs across the grass , chasing a ball .",
    "Two people sitting at a table with plates of food.",
    "A red bus driving down a city street next to tall buildings.",
    "a kitchen with a stove , a sink and wooden cabinets",
    "A cat laying on a couch next to a remote control.",
    "Several giraffes standing in a field near some trees.",
    "A woman holding an umbrella while walking in the rain.",
]


# ---- the data set ------------------------------------------------------------------------------
def base_captions() -> list[str]:
    caps = []
    for name in BASE_FILES:
        f = SHARED / name
        if f.is_file():
            caps += [a["caption"] for a in json.loads(f.read_text())["annotations"]]
    return caps or FALLBACK


def caption_maker(seed: int = 0):
    """Real captions with one word swapped for another word of the pool (drawn with Zipf-like
    weights, so the vocabulary has COCO's long tail): real shapes, almost all distinct."""
    rng = random.Random(seed)
    base = base_captions()
    words = sorted({w for c in base for w in re.findall(r"[a-z]+", c.lower())})
    weights = [1 / (k + 1) for k in range(len(words))]
    rng.shuffle(words)
    rare = [w + "".join(rng.choices("aeioubdklmnrst", k=3)) for w in rng.choices(words, k=20_000)]  # COCO's tail
    pool = rng.choices(words, weights, k=200_000) + rare

    def make() -> str:
        parts = rng.choice(base).split(" ")
        spots = [k for k, w in enumerate(parts) if w.isalpha() and k > 0]
        if spots:
            parts[rng.choice(spots)] = rng.choice(pool)
        return " ".join(parts)

    return make


def build_data(work: Path, sizes: list[int], val: int, log) -> None:
    """work/images (links), work/captions_train_N.json per size, work/captions_val.json."""
    from PIL import Image

    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    src = []
    for k, color in enumerate([(200, 30, 30), (30, 160, 60), (40, 40, 200)]):
        p = work / f"source{k}.jpg"
        if not p.exists():  # rewriting it would touch every link: a new identity, a cache miss for all
            Image.new("RGB", (64, 48), color).save(p, quality=90)
        src.append(p)
    total = max(sizes) + val
    t = time.time()
    for i in range(total):
        dst = images / f"{i:012d}.jpg"
        if not dst.exists():
            try:
                os.link(src[i % 3], dst)
            except OSError:  # a file system without hard links: tiny copies
                shutil.copyfile(src[i % 3], dst)
    make = caption_maker()
    n = max(sizes)
    # COCO 2017 train has 5.003 captions a photo: 5 each, one more for some, exact at its size
    extra = round(n * (COCO_CAPTIONS / COCO_PHOTOS - 5))
    per_photo = [5 + (i < extra) for i in range(n)] + [5] * val
    captions = [[make() for _ in range(k)] for k in per_photo]

    def write(path: Path, ids: range) -> None:
        anns = [{"image_id": i, "caption": c} for i in ids for c in captions[i]]
        random.Random(len(ids)).shuffle(anns)  # COCO's annotations are not grouped by photo
        data = {
            "images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": 64, "height": 48} for i in ids],
            "annotations": [a | {"id": k} for k, a in enumerate(anns)],
        }
        path.write_text(json.dumps(data))

    for size in sizes:
        write(work / f"captions_train_{size}.json", range(size))
    write(work / "captions_val.json", range(n, n + val))
    log(f"data: {total} photos (links), {sum(per_photo)} captions in {time.time() - t:.0f} s")


def fill_cache(work: Path, total: int) -> dict:
    """Synthetic features for every photo, through FeatureCache.put (the real index and files)."""
    import numpy as np
    import torch

    from captioner.encoders import build_encoder
    from captioner.features import FeatureCache

    encoder = build_encoder("efficientnet_lite0")
    cache = FeatureCache(encoder, work / "cache")
    with torch.no_grad():
        shape = encoder(torch.zeros(1, 3, 224, 224)).shape[1:]  # (R, D): what extraction would store
    paths = [work / "images" / f"{i:012d}.jpg" for i in range(total)]
    block = torch.from_numpy(np.random.default_rng(0).standard_normal((256, *shape), dtype=np.float32))
    t = time.time()
    cache.put(paths, (block[: min(256, len(paths) - s)] for s in range(0, len(paths), 256)))
    seconds = time.time() - t
    size = sum(f.stat().st_size for f in cache.dir.iterdir())
    return {"rows": len(paths), "shape": list(shape), "bytes": size, "seconds": seconds}


# ---- measurements, each in its own process --------------------------------------------------------
def memory() -> dict:
    """Peak and current RSS (MB); current split into anonymous memory and mapped files."""
    status = Path("/proc/self/status").read_text() if Path("/proc/self/status").is_file() else ""
    kb = {k: int(v.split()[0]) for k, v in re.findall(r"^(\w+):\s+(\d+ kB)$", status, re.M)}
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_mb": kb.get("VmRSS", 0) / 1024,
        "anon_mb": kb.get("RssAnon", 0) / 1024,
        "file_mb": kb.get("RssFile", 0) / 1024,
    }


def phase_load(work: Path, size: int) -> dict:
    from captioner.data import load_coco
    from captioner.training.trainer import training_vocabulary

    t = time.time()
    train = load_coco(work / f"captions_train_{size}.json", work / "images")
    loaded = time.time() - t
    vocab = training_vocabulary(train, 5)
    return {
        "load_s": loaded,
        "load_vocab_s": time.time() - t,
        "photos": len(train),
        "captions": sum(map(len, train.captions)),
        "vocab": len(vocab),
    } | memory()


def phase_open(work: Path, size: int) -> dict:
    from captioner.data import load_coco
    from captioner.encoders import build_encoder
    from captioner.features import FeatureCache

    train = load_coco(work / f"captions_train_{size}.json", work / "images")
    cache = FeatureCache(build_encoder("efficientnet_lite0"), work / "cache")
    t = time.time()
    grid = cache.load(train.paths, "grid")
    seconds = time.time() - t
    cache.load(load_coco(work / "captions_val.json", work / "images").paths, "grid")  # a miss would extract
    return {"open_s": seconds, "rows": len(grid)} | memory()


def phase_train(work: Path, size: int, decoder: str, steps: int, validate: bool) -> dict:
    t0 = time.time()
    from captioner import distributed
    from captioner.data import load_coco
    from captioner.training import Trainer, TrainOptions

    imported = time.time() - t0
    dist = distributed.init("cpu")
    train = load_coco(work / f"captions_train_{size}.json", work / "images")
    val = load_coco(work / "captions_val.json", work / "images")
    opts = TrainOptions(decoder=decoder, epochs=1, lr_schedule="constant", num_workers=0, calibrate=False)
    out = Path(tempfile.mkdtemp(prefix="scale-run-"))
    trainer = Trainer(train, val, out, opts, device="cpu", cache_dir=work / "cache", dist=dist)
    trainer.prepare()
    prepared = time.time() - t0
    trainer.train_steps(1)
    startup = time.time() - t0
    t = time.time()
    trainer.train_steps(steps - 1, epoch=1)
    rate = (steps - 1) / (time.time() - t)
    result = {
        "import_s": imported,
        "prepare_s": prepared,
        "startup_s": startup,
        "steps_per_s": rate,
        "batch": opts.batch_size,
        "world": dist.world_size,
        "rank": dist.rank,
    } | memory()
    if validate and dist.is_main:
        from captioner.evaluation import references
        from captioner.metrics import evaluate
        from captioner.training.validation import val_captions

        dataset, feats = trainer.val_data
        t = time.time()
        captions = val_captions(trainer.model, dataset.corpus, feats, 1)
        decoded = time.time() - t
        scores = evaluate(references(dataset.corpus), captions)
        result |= {
            "val_photos": len(captions),
            "val_decode_s": decoded,
            "val_metrics_s": time.time() - t - decoded,
            "meteor": scores["METEOR_backend"],
        }
    shutil.rmtree(out, ignore_errors=True)
    if dist.enabled:
        results = [None] * dist.world_size
        import torch.distributed as td

        td.all_gather_object(results, result)
        result = {"ranks": results}
        distributed.shutdown()
    return result


def phase_speed(work: Path, sizes: list[int], decoder: str, steps: int, rounds: int = 5) -> dict:
    """Steps per second at the smallest and the largest size side by side: one process trains both,
    alternating blocks of steps, so load from elsewhere on the machine hits both alike."""
    import captioner.training.trainer as trainer_module
    from captioner.data import load_coco
    from captioner.training import Trainer, TrainOptions

    opts = TrainOptions(decoder=decoder, epochs=1, lr_schedule="constant", num_workers=0, calibrate=False)
    ends = (min(sizes), max(sizes))
    corpora = {size: load_coco(work / f"captions_train_{size}.json", work / "images") for size in ends}
    # the same model at both sizes: the larger set's vocabulary (a set's own vocabulary grows with it,
    # 4.8k words at 10k photos, 11k at 118k, and the output layer with it: that is the model, not the data path)
    vocab = trainer_module.training_vocabulary(corpora[max(sizes)], opts.min_word_count)
    trainer_module.training_vocabulary = lambda train, min_count: vocab
    trainers = {}
    for size, train in corpora.items():
        trainers[size] = Trainer(train, None, tempfile.mkdtemp(prefix="scale-run-"), opts, device="cpu",
                                 cache_dir=work / "cache")  # fmt: skip
        trainers[size].train_steps(2)  # warm
    seconds = dict.fromkeys(trainers, 0.0)
    block = max(1, steps // rounds)
    for r in range(rounds):
        for size, trainer in trainers.items():
            t = time.time()
            trainer.train_steps(block, epoch=1 + r)
            seconds[size] += time.time() - t
    for trainer in trainers.values():
        shutil.rmtree(trainer.out, ignore_errors=True)
    rate = {str(size): block * rounds / s for size, s in seconds.items()}
    return {"steps_per_s": rate, "ratio": rate[str(min(sizes))] / rate[str(max(sizes))], "vocab": len(vocab)}


PHASES = {"load": phase_load, "open": phase_open, "cache": fill_cache}


def run_phase(args: argparse.Namespace, phase: str, size: int, *extra: str, ddp: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--phase", phase, "--size", str(size), "--work", str(args.work), *extra]
    if ddp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ddp}", *cmd[1:]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"{phase} at {size} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[0])


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.rjust(w) if k else c.ljust(w) for k, (c, w) in enumerate(zip(r, widths))) for r in rows
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=f"10000,40000,{COCO_PHOTOS}", help="training photos, comma-separated")
    ap.add_argument("--val", type=int, default=5000, help="val photos (COCO's Karpathy val: 5000)")
    ap.add_argument("--steps", type=int, default=200, help="training steps timed (batch 64)")
    ap.add_argument("--ddp-steps", type=int, default=50, help="steps of the 2-process run (0: none)")
    ap.add_argument("--decoders", default="lstm,attention")
    ap.add_argument("--work", type=Path, help="where the data set and cache go (kept; default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--build-only", action="store_true", help="build the data set and cache in --work, measure nothing")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--decoder", help=argparse.SUPPRESS)
    ap.add_argument("--validate", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:  # a measurement in its own process: one JSON line on stdout
        import logging

        logging.getLogger("captioner").setLevel(logging.WARNING)
        if args.phase == "train":
            out = phase_train(args.work, args.size, args.decoder, args.steps, args.validate)
        elif args.phase == "speed":
            out = phase_speed(args.work, [int(x) for x in args.sizes.split(",")], args.decoder, args.steps)
        else:
            out = PHASES[args.phase](args.work, args.size)
        if int(os.environ.get("RANK", 0)) == 0:  # one line: every rank of a DDP phase holds the gathered result
            print(json.dumps(out))
        return

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    sizes = sorted(int(s) for s in args.sizes.split(","))
    temporary = args.work is None
    args.work = args.work or Path(tempfile.mkdtemp(prefix="captioner-scale-"))
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict = {"sizes": sizes, "val": args.val, "steps": args.steps, "at": {}}
    try:
        if not all((args.work / f"captions_train_{s}.json").is_file() for s in sizes):
            build_data(args.work, sizes, args.val, log)
        if not (args.work / "cache").is_dir():
            fill = run_phase(args, "cache", max(sizes) + args.val)
            gb, seconds = fill["bytes"] / 1e9, fill["seconds"]
            log(f"cache: {fill['rows']} rows {fill['shape']} fp16, {gb:.1f} GB in {seconds:.0f} s")
            results["cache"] = fill
        decoders = args.decoders.split(",")
        for size in [] if args.build_only else sizes:
            r = results["at"][size] = {}
            r["load"] = run_phase(args, "load", size)
            r["open"] = run_phase(args, "open", size)
            for dec in decoders:
                extra = ["--decoder", dec, "--steps", str(args.steps)]
                if size == max(sizes) and dec == decoders[-1] and args.val:
                    extra.append("--validate")
                r[dec] = run_phase(args, "train", size, *extra)
            if size == max(sizes) and len(sizes) > 1:  # steps/s side by side with the smallest size
                for dec in decoders:
                    r[f"{dec}_speed"] = run_phase(args, "speed", size, "--decoder", dec, "--steps", str(args.steps),
                                                  "--sizes", args.sizes)  # fmt: skip
            if args.ddp_steps:
                r["ddp"] = run_phase(
                    args, "train", size, "--decoder", decoders[-1], "--steps", str(args.ddp_steps), ddp=2
                )
            log(f"{size}: done")
    finally:
        if temporary and not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    if not temporary:
        (args.work / "results.json").write_text(json.dumps(results, indent=1))
    if args.json:
        print(json.dumps(results, indent=1))
        return
    if not args.build_only:
        report(results, decoders)


def report(results: dict, decoders: list[str]) -> None:
    sizes = results["sizes"]
    at = results["at"]
    first = at[sizes[0]]
    rows = [["", *(f"{s:,} photos" for s in sizes), f"{sizes[-1]:,} / {sizes[0]:,}"]]

    def row(label: str, get, fmt: str = "{:.1f}", ratio: bool = True) -> None:
        vals = [get(at[s]) for s in sizes]
        rows.append([label, *(fmt.format(v) for v in vals), f"{vals[-1] / vals[0]:.2f}x" if ratio and vals[0] else ""])

    row("captions", lambda r: r["load"]["captions"], "{:,}", False)
    row("load + vocabulary, s", lambda r: r["load"]["load_vocab_s"])
    row("  peak RSS, MB", lambda r: r["load"]["peak_rss_mb"], "{:.0f}")
    row("cache open, s", lambda r: r["open"]["open_s"], "{:.2f}")
    for dec in decoders:
        row(f"{dec}: start-up, s", lambda r, d=dec: r[d]["startup_s"])
        row("  steps/s", lambda r, d=dec: r[d]["steps_per_s"], "{:.2f}")
        row(f"  RSS after {results['steps']} steps, MB", lambda r, d=dec: r[d]["rss_mb"], "{:.0f}")
        row("    of it anonymous, MB", lambda r, d=dec: r[d]["anon_mb"], "{:.0f}")
    for dec in decoders:
        side = at[sizes[-1]].get(f"{dec}_speed")
        if side:
            small, large = (side["steps_per_s"][str(s)] for s in (sizes[0], sizes[-1]))
            rows.append([f"{dec}: steps/s, one vocabulary", f"{small:.2f}", *[""] * (len(sizes) - 2), f"{large:.2f}",
                         f"{large / small:.2f}x"])  # fmt: skip
    if "ddp" in first:
        row("2-process DDP: start-up, s", lambda r: max(x["startup_s"] for x in r["ddp"]["ranks"]))
        row("  steps/s (global batch 128)", lambda r: min(x["steps_per_s"] for x in r["ddp"]["ranks"]), "{:.2f}")
        row("  RSS per process, MB", lambda r: max(x["rss_mb"] for x in r["ddp"]["ranks"]), "{:.0f}")
    print(table(rows))
    last = at[sizes[-1]][decoders[-1]]
    if "val_photos" in last:
        print(
            f"validation over {last['val_photos']} photos ({decoders[-1]}, greedy): captions "
            f"{last['val_decode_s']:.1f} s, metrics {last['val_metrics_s']:.1f} s (METEOR: {last['meteor']})"
        )


if __name__ == "__main__":
    main()
