"""Where the time of one warm photo goes, on the torch and the ONNX path, and how far each part is from its limit.

    python benchmarks/profile_photo.py [--photos 64] [--batch 32] [--repeats 3] [--export DIR] [--json OUT]

The bundled model (EfficientNet-Lite0 at 224 px, 7x7x1280 grid; one-layer attention LSTM decoder,
beam 3 with guidance, the model's decoding defaults) captions --photos Flickr8k val photos (else
assets/examples/*.jpg, cycled), through the public model interface that `Pipeline.generate` uses:
`model.prepare(path)` per photo, `model.encode_prepared(batch)`, `pipeline.decode(features)`.
Each part is timed per photo, warm (after a warm-up pass), at batch 1 and at batch --batch; a
part's time is the best of --repeats passes over all the photos, the two paths' passes interleaved
(the machine's noise hits both alike). The ONNX path is an fp32 `captioner export` written to a
temporary folder (or read from --export DIR).

Decoding is split by wrapping the model's step model (`model.steps()`, instance attribute, this
script only) and `model.classify`: decoder init (init_state), decoder steps (every `step` call,
with its rows counted), the ImageNet head (classify) and the rest (beam bookkeeping in numpy and
state gathers, guidance, constraints, the constrained re-search's own numpy).

Limits. FLOP = 2 x multiply-accumulate, counted by torch.utils.flop_counter.FlopCounterMode on the
torch modules (convolutions and matrix products only; activations, softmax and gathers count 0):
the encoder on one photo, the decoder per step row (one beam of one photo for one word) and a
whole decode of the batch; the ONNX graphs are the same networks, so they get the same counts.
Attainable fp32 FLOP/s: the best of a 2048^3 matmul in torch and in numpy, all threads. The
decoder step is also set against memory: its per-word weights are read once per call (floor: a
matrix-vector product over as many bytes, best of torch and numpy: from the L3 cache when they stay
there), and per row it writes and reads the gathered memory rows and its logits (floor: a large
numpy copy's bandwidth, read + write counted). One step call alone (outside the search, at 1, 3 and
3 x batch rows) shows its fixed cost and its cost per row. The limits are measured before and
after the passes, the best of the two kept.

The cores may be shared: the 1-min load average is printed, and every time is a best of several.
On a busy machine torch's OpenMP threads, which spin at their barriers, suffer most at batch 1
(--threads 1, or OMP_WAIT_POLICY=PASSIVE, shows how much).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import FLICKR8K, REPO, machine
from torch.utils.flop_counter import FlopCounterMode

from captioner.data import load_coco
from captioner.model import Model
from captioner.pipeline import Pipeline
from captioner.runtime import OnnxModel

STEP_LAYERS = ("att_hidden", "att_score", "gate", "where", "cell", "out")  # what one word runs (embed: its rows)
PARTS = ("prepare", "encoder", "decode", "init", "steps", "head", "rest")
LABELS = {
    "prepare": "read + JPEG decode + resize/crop (prepare)",
    "encoder": "encoder (encode_prepared)",
    "decode": "decoding (pipeline.decode), all",
    "init": "  decoder init (init_state)",
    "steps": "  decoder steps (step calls)",
    "head": "  ImageNet head (classify)",
    "rest": "  rest: beam bookkeeping, guidance, constraints",
    "photo": "whole photo",
}


def photo_paths(n: int) -> tuple[list[Path], str]:
    val = FLICKR8K / "captions_val.json"
    if val.is_file():
        paths = list(load_coco(val, FLICKR8K / "images").paths[:n])
        return paths, f"{len(paths)} Flickr8k val photos"
    examples = sorted((REPO / "assets" / "examples").glob("*.jpg"))
    return [examples[i % len(examples)] for i in range(n)], f"{n} photos cycled from {len(examples)} examples"


# ---- instrumenting the model's step model and classifier ---------------------------------------
class Recorder:
    """Seconds per part and counts (step calls, rows, searches) of the pass under way."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.s: defaultdict[str, float] = defaultdict(float)
        self.n: Counter[str] = Counter()


class TimedSteps:
    """A step model (beam.py) that times its inner one's init_state and step calls."""

    def __init__(self, inner: Any, rec: Recorder) -> None:
        self.inner, self.rec = inner, rec

    def init_state(self, features: Any) -> Any:
        t = time.perf_counter()
        state = self.inner.init_state(features)
        self.rec.s["init"] += time.perf_counter() - t
        self.rec.n["searches"] += 1
        self.rec.n["searched"] += state.batch_size  # photos searched (more than B: constrained re-searches)
        return state

    def step(self, tokens: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        t = time.perf_counter()
        out = self.inner.step(tokens, state)
        self.rec.s["steps"] += time.perf_counter() - t
        self.rec.n["calls"] += 1
        self.rec.n["rows"] += len(tokens)
        return out


def instrument(model: Any, rec: Recorder) -> None:
    """Time `model`'s step model and classifier from now on (on this instance only)."""
    steps, classify = model.steps, model.classify

    @contextmanager
    def timed_steps():
        with steps() as inner:
            yield TimedSteps(inner, rec)

    def timed_classify(features: Any) -> Any:
        t = time.perf_counter()
        out = classify(features)
        rec.s["head"] += time.perf_counter() - t
        return out

    model.steps, model.classify = timed_steps, timed_classify


def run_pass(model: Any, pipeline: Pipeline, paths: list[Path], batch: int, rec: Recorder) -> dict[str, Any]:
    """Caption `paths` `batch` at a time -> seconds per part (whole pass) and counts."""
    rec.reset()
    for s in range(0, len(paths), batch):
        t0 = time.perf_counter()
        prepared = [model.prepare(p) for p in paths[s : s + batch]]
        t1 = time.perf_counter()
        features = model.encode_prepared(prepared)
        t2 = time.perf_counter()
        pipeline.decode(features)
        t3 = time.perf_counter()
        rec.s["prepare"] += t1 - t0
        rec.s["encoder"] += t2 - t1
        rec.s["decode"] += t3 - t2
        rec.n["batches"] += 1
    s = dict(rec.s)
    s["rest"] = s["decode"] - s.get("init", 0.0) - s.get("steps", 0.0) - s.get("head", 0.0)
    return {"s": s, "n": dict(rec.n)}


def best_of(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """Each part's best pass; decoding's split (and counts) from the pass with the best decoding."""
    best = min(passes, key=lambda p: p["s"]["decode"])
    s = {k: best["s"].get(k, 0.0) for k in ("decode", "init", "steps", "head", "rest")}
    s["prepare"] = min(p["s"]["prepare"] for p in passes)
    s["encoder"] = min(p["s"]["encoder"] for p in passes)
    return {"s": s, "n": best["n"]}


# ---- limits ------------------------------------------------------------------------------------
def flops(fn: Any) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Attainable fp32 FLOP/s: the best n^3 matmul in torch and in numpy (all threads)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    an, bn = a.numpy(), b.numpy()
    cn = np.empty((n, n), np.float32)
    out = {}
    for name, fn in (("torch", lambda: torch.mm(a, b, out=c)), ("numpy", lambda: np.matmul(an, bn, out=cn))):
        fn()
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        out[name] = 2 * n**3 / best
    return out


def copy_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Bytes/s of a large numpy copy, read + write counted."""
    src = np.ones(mib * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best


def weights_pass(nbytes: float, repeats: int = 50) -> float:
    """Seconds to stream `nbytes` of fp32 weights once: a matrix-vector product over an (m, 2048)
    matrix that size, best of torch and numpy (cache-resident when it fits, as the decoder's weights
    may stay between its calls). What a step call at a few rows cannot beat."""
    m = max(1, int(nbytes / 4 / 2048))
    w, x = torch.randn(m, 2048), torch.randn(2048)
    wn, xn = w.numpy(), x.numpy()
    best = float("inf")
    for fn in (lambda: torch.mv(w, x), lambda: wn @ xn):
        fn()
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
    return best


def limits(weight_bytes: float) -> dict[str, Any]:
    """What the machine attains: matmul FLOP/s (torch, numpy), copy bandwidth, a pass over the step's weights."""
    return {"peaks": matmul_peak(), "bw": copy_bandwidth(), "wpass": weights_pass(weight_bytes)}


def step_bytes(decoder: Any, regions: int, feature_dim: int) -> dict[str, float]:
    """Bytes one step call touches: the per-word layers' weights once per call; per row its embedding,
    the memory rows gathered for it (R x (D + A + 2) fp32, written then read) and its logits
    (written, log-softmaxed, read)."""
    layers = {n: sum(p.numel() * p.element_size() for p in getattr(decoder, n).parameters()) for n in STEP_LAYERS}
    attention = decoder.att_feat.out_features
    per_row = (
        decoder.embed.embedding_dim * 4
        + 2 * regions * (feature_dim + attention + 2) * 4
        + 3 * decoder.out.out_features * 4
    )
    return {
        "weights": float(sum(layers.values())),
        "per_row": float(per_row),
        **{f"w_{k}": v for k, v in layers.items()},
    }


def step_cost(model: Any, features: Any, rows: tuple[int, ...], repeats: int = 20) -> dict[int, float]:
    """Seconds of one step call alone at each row count (best of repeats), outside the search."""
    out = {}
    with model.steps() as steps:
        start = steps.init_state(model.decoder_input(features[:1]))
        for n in rows:
            state = start.repeat_interleave(n)
            tokens = np.full(n, model.vocab.start_id, dtype=np.int64)
            steps.step(tokens, state)
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                steps.step(tokens, state)
                best = min(best, time.perf_counter() - t)
            out[n] = best
    return out


def count_flops(model: Model, pipeline: Pipeline, paths: list[Path], batch: int) -> dict[str, float]:
    """FLOPs of the torch networks: encoder per photo, decoder init and ImageNet head per photo, one
    step row, and a whole decode of the first `batch` photos (with its step rows counted)."""
    x = model.prepare(paths[0])
    one = model.encode_prepared([x])
    with model.steps() as steps:
        inputs = model.decoder_input(one)
        init = flops(lambda: steps.init_state(inputs))
        state = steps.init_state(inputs).repeat_interleave(3)
        tokens = np.full(3, model.vocab.start_id, dtype=np.int64)
        row = flops(lambda: steps.step(tokens, state)) / 3
    head = flops(lambda: model.classify(one))
    encoder = flops(lambda: model.encode_prepared([x]))
    features = model.encode_prepared([model.prepare(p) for p in paths[:batch]])
    rec = Recorder()
    instrument(model, rec)
    decode = flops(lambda: pipeline.decode(features))
    del model.steps, model.classify  # the class's own methods again
    n = len(paths[:batch])
    return {
        "encoder": encoder,
        "init": init,
        "head": head,
        "row": row,
        "decode_batch": decode / n,
        # init once per photo searched (a constrained re-search starts its photos again), the head once per photo
        "decode_counted": (rec.n["searched"] * init + n * head + rec.n["rows"] * row) / n,
        "searched": rec.n["searched"] / n,
    }


# ---- report ------------------------------------------------------------------------------------
def part_flops(part: str, counts: dict[str, int], n_photos: int, fl: dict[str, float]) -> float | None:
    """FLOPs per photo of a part (None: not counted), with the step rows and searches of its pass."""
    init = fl["init"] * counts["searched"] / n_photos  # a constrained re-search starts its photos again
    steps = fl["row"] * counts["rows"] / n_photos
    per_photo = {"encoder": fl["encoder"], "init": init, "head": fl["head"], "steps": steps, "rest": None}
    per_photo["decode"] = init + fl["head"] + steps
    per_photo["photo"] = fl["encoder"] + per_photo["decode"]
    return per_photo.get(part)


def table(name: str, res: dict[int, dict[str, Any]], n_photos: int, fl: dict[str, float], peak: float) -> list[dict]:
    b1, bb = sorted(res)
    rows = []
    for part in (*PARTS, "photo"):
        ms = {}
        for b in (b1, bb):
            s = res[b]["s"]
            sec = s["prepare"] + s["encoder"] + s["decode"] if part == "photo" else s[part]
            ms[b] = 1e3 * sec / n_photos
        f = {b: part_flops(part, res[b]["n"], n_photos, fl) for b in (b1, bb)}
        gflop = None if f[bb] is None else f[bb] / 1e9
        rate = {b: (f[b] / (ms[b] / 1e3) / 1e9 if f[b] is not None and ms[b] else None) for b in (b1, bb)}
        rows.append({"part": part, "ms": ms, "gflop": gflop, "gflops": rate})
    print(f"\n{name}: ms per photo, warm, best of the passes; GFLOP/s = the part's FLOPs over its time")
    print(
        f"| part | ms/photo b{b1} | ms/photo b{bb} | GFLOP/photo | GFLOP/s b{b1} | GFLOP/s b{bb} "
        f"| % peak b{b1} | % peak b{bb} |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        g = "-" if r["gflop"] is None else f"{r['gflop']:.3f}"
        rates = [r["gflops"][b] for b in (b1, bb)]
        rs = ["-" if x is None else f"{x:.1f}" for x in rates]
        ps = ["-" if x is None else f"{100 * x * 1e9 / peak:.1f}%" for x in rates]
        cells = [LABELS[r["part"]], f"{r['ms'][b1]:.2f}", f"{r['ms'][bb]:.2f}", g, *rs, *ps]
        print("| " + " | ".join(cells) + " |")
    return rows


def step_table(
    name: str, res: dict[int, dict[str, Any]], fl: dict[str, float], mem: dict[str, float], bw: float, peak: float,
    wpass: float, cost: dict[int, float], n_photos: int,
) -> dict[str, Any]:  # fmt: skip
    """The decoder step per call at each batch size, set against its compute and memory floors."""
    print(f"\n{name}: the decoder step, per call (in the search)")
    print("| | " + " | ".join(f"batch {b}" for b in sorted(res)) + " |")
    print("|---|" + "---|" * len(res))
    lines: dict[str, list[str]] = defaultdict(list)
    out: dict[str, Any] = {}
    for b in sorted(res):
        n, s = res[b]["n"], res[b]["s"]
        calls, rows = n["calls"], n["rows"]
        per_call = s["steps"] / calls
        f = fl["row"] * rows / calls
        row_bytes = mem["per_row"] * rows / calls
        byt = mem["weights"] + row_bytes
        floor_c, floor_m = f / peak, wpass + row_bytes / bw
        lines["step calls per batch (per search)"].append(f"{calls / n['batches']:.1f} ({calls / n['searches']:.1f})")
        lines["rows per call (live beams x photos)"].append(f"{rows / calls:.1f}")
        lines["rows per photo (words x live beams)"].append(f"{rows / n_photos:.1f}")
        lines["ms per call"].append(f"{1e3 * per_call:.3f}")
        lines["MFLOP per call"].append(f"{f / 1e6:.1f}")
        lines["achieved GFLOP/s (% of peak)"].append(f"{f / per_call / 1e9:.1f} ({100 * f / per_call / peak:.1f}%)")
        lines["MB touched per call (weights + rows)"].append(f"{byt / 1e6:.1f}")
        lines["achieved GB/s (% of copy bandwidth)"].append(
            f"{byt / per_call / 1e9:.1f} ({100 * byt / per_call / bw:.0f}%)"
        )
        lines["floor ms: compute (FLOP / peak)"].append(f"{1e3 * floor_c:.3f}")
        lines["floor ms: memory (weights pass + rows at copy bw)"].append(f"{1e3 * floor_m:.3f}")
        lines["x above the higher floor"].append(f"{per_call / max(floor_c, floor_m):.1f}x")
        out[b] = {
            "ms_per_call": 1e3 * per_call,
            "rows_per_call": rows / calls,
            "flop_per_call": f,
            "bytes_per_call": byt,
            "floor_compute_ms": 1e3 * floor_c,
            "floor_memory_ms": 1e3 * floor_m,
        }
    for k, v in lines.items():
        print(f"| {k} | " + " | ".join(v) + " |")
    (n1, t1), (n3, t3), (nn, tn) = sorted(cost.items())
    print(
        f"one step call alone (best of 20, outside the search): {n1} row {1e3 * t1:.3f} ms, {n3} rows "
        f"{1e3 * t3:.3f} ms, {nn} rows {1e3 * tn:.3f} ms ({1e6 * (tn - t3) / (nn - n3):.0f} us per row from "
        f"{n3} to {nn}); a pass over the same {mem['weights'] / 1e6:.1f} MB of weights alone: {1e3 * wpass:.3f} ms"
    )
    out["alone_ms"] = {r: 1e3 * t for r, t in cost.items()}
    out["per_row_us"] = 1e6 * (tn - t3) / (nn - n3)
    return out


def conclusions(name: str, rows: list[dict], steps: dict[str, Any], peak: float) -> list[str]:
    """A few lines computed from the numbers: what dominates, how far each part is from its floor."""
    by = {r["part"]: r for r in rows}
    out = []
    bs = sorted(by["photo"]["ms"])
    for b in bs:
        total = by["photo"]["ms"][b]
        shares = {p: by[p]["ms"][b] / total for p in ("prepare", "encoder", "decode")}
        top = max(shares, key=shares.get)
        out.append(
            f"{name}, batch {b}: {total:.1f} ms/photo; {top} is {100 * shares[top]:.0f}% "
            f"(prepare {100 * shares['prepare']:.0f}%, encoder {100 * shares['encoder']:.0f}%, "
            f"decoding {100 * shares['decode']:.0f}%: steps {100 * by['steps']['ms'][b] / total:.0f}%, "
            f"rest {100 * by['rest']['ms'][b] / total:.0f}%)"
        )
    enc = by["encoder"]["gflops"]
    out.append(
        f"{name}: the encoder runs at {enc[bs[0]]:.1f} / {enc[bs[1]]:.1f} GFLOP/s (batch {bs[0]} / {bs[1]}), "
        f"{100 * enc[bs[1]] * 1e9 / peak:.0f}% of the matmul peak at batch {bs[1]}: "
        f"{peak / (enc[bs[1]] * 1e9):.1f}x above its compute floor"
    )
    (n3, t3), (nn, tn) = sorted(steps["alone_ms"].items())[-2:]
    for b in bs:
        st = steps[b]
        r = st["rows_per_call"]
        alone = t3 + (r - n3) * (tn - t3) / (nn - n3)  # interpolated between the call alone at n3 and nn rows
        out.append(
            f"{name}, batch {b}: a step call ({r:.1f} rows) takes {st['ms_per_call']:.2f} ms in the search, "
            f"{st['ms_per_call'] / st['floor_compute_ms']:.1f}x its compute floor and "
            f"{st['ms_per_call'] / st['floor_memory_ms']:.1f}x its memory floor ({st['floor_compute_ms']:.3f} / "
            f"{st['floor_memory_ms']:.3f} ms); alone, outside the search, about {alone:.2f} ms"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    ap.add_argument("--export", metavar="DIR", help="an fp32 export folder to use (default: export to a temp dir)")
    ap.add_argument("--json", metavar="OUT", help="write the numbers here as JSON")
    a = ap.parse_args()

    if a.threads:
        torch.set_num_threads(a.threads)
    load_before = os.getloadavg()[0]
    paths, source = photo_paths(a.photos)
    batch = min(a.batch, len(paths))
    if batch < 2:
        ap.error("need --photos and --batch of 2 or more (batch 1 is always measured)")
    tmp = None
    if a.export:
        folder = Path(a.export)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="profile_photo_")
        folder = Path(tmp.name) / "export"
        cmd = [sys.executable, "-m", "captioner", "export", "--out", str(folder), "--quiet"]
        subprocess.run(cmd, check=True, cwd=REPO)

    torch_model = Model.load(None, "cpu")
    onnx_model = OnnxModel.load(folder, "cpu")
    models = {"torch": torch_model, "onnx": onnx_model}
    pipelines = {k: Pipeline.for_model(m) for k, m in models.items()}

    fl = count_flops(torch_model, pipelines["torch"], paths, batch)
    grid = torch_model.encode_prepared([torch_model.prepare(paths[0])])
    mem = step_bytes(torch_model.decoder, grid.shape[1], grid.shape[2])
    before = limits(mem["weights"])
    rows = (1, 3, 3 * batch)  # one beam; one photo's beams; a full batch's
    costs = {k: step_cost(m, grid if k == "torch" else grid.numpy(), rows) for k, m in models.items()}

    recs = {k: Recorder() for k in models}
    for k, m in models.items():
        instrument(m, recs[k])
        run_pass(m, pipelines[k], paths[: min(4, len(paths))], 1, recs[k])  # warm-up
        run_pass(m, pipelines[k], paths[:batch], batch, recs[k])
    passes: dict[str, dict[int, list]] = {k: {1: [], batch: []} for k in models}
    for _ in range(a.repeats):  # interleaved: both paths and batch sizes see the same machine state
        for k, m in models.items():
            for b in (1, batch):
                passes[k][b].append(run_pass(m, pipelines[k], paths, b, recs[k]))
    results = {k: {b: best_of(v) for b, v in per.items()} for k, per in passes.items()}
    after = limits(mem["weights"])
    peaks = {k: max(before["peaks"][k], after["peaks"][k]) for k in before["peaks"]}
    peak = max(peaks.values())
    bw, wpass = max(before["bw"], after["bw"]), min(before["wpass"], after["wpass"])

    print(
        f"machine: {machine()}, {os.cpu_count()} cores; onnxruntime's default threads; "
        f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (other work shares the cores)"
    )
    print(
        f"{source}; decoding defaults {pipelines['torch'].defaults}; batch 1 and {batch}; "
        f"best of {a.repeats} passes; export {'given: ' + str(folder) if a.export else 'fp32, made in a temp dir'}"
    )
    print(
        f"attainable fp32: matmul 2048^3 torch {peaks['torch'] / 1e9:.1f} GFLOP/s, numpy {peaks['numpy'] / 1e9:.1f} "
        f"GFLOP/s (peak used: {peak / 1e9:.1f}); numpy copy 256 MiB {bw / 1e9:.1f} GB/s (read + write); "
        f"best before/after the passes"
    )
    print(
        f"FLOPs (FlopCounterMode, 2 x MAC, conv/matmul only): encoder {fl['encoder'] / 1e9:.3f} GFLOP/photo; "
        f"decoder init {fl['init'] / 1e6:.1f} MFLOP/photo searched; ImageNet head {fl['head'] / 1e6:.2f} MFLOP; "
        f"one step row {fl['row'] / 1e6:.2f} MFLOP; a whole torch decode of {batch} photos "
        f"{fl['decode_batch'] / 1e6:.1f} MFLOP/photo (init x photos searched + head + counted rows x row: "
        f"{fl['decode_counted'] / 1e6:.1f})"
    )
    w = ", ".join(f"{k[2:]} {v / 1e6:.2f}" for k, v in mem.items() if k.startswith("w_"))
    print(
        f"decoder step memory: per-word weights {mem['weights'] / 1e6:.1f} MB once per call ({w} MB), "
        f"+ {mem['per_row'] / 1e3:.0f} kB per row (gathered {grid.shape[1]}-region memory rows written + read, "
        f"embedding, logits)"
    )
    report: dict[str, Any] = {
        "machine": machine(),
        "load_average": [load_before, os.getloadavg()[0]],
        "photos": source,
        "batch": batch,
        "repeats": a.repeats,
        "peak_flops": peaks,
        "copy_bandwidth": bw,
        "flops": fl,
        "step_bytes": mem,
        "weights_pass_s": wpass,
        "paths": {},
    }
    notes = []
    for k in models:
        rows = table(k, results[k], len(paths), fl, peak)
        st = step_table(k, results[k], fl, mem, bw, peak, wpass, costs[k], len(paths))
        notes += conclusions(k, rows, st, peak)
        report["paths"][k] = {"parts": rows, "steps": st, "counts": {b: r["n"] for b, r in results[k].items()}}
    print("\nconclusions:")
    for line in notes:
        print(f"- {line}")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
