"""The bundled model on torch vs the same model exported to ONNX (`captioner export`) on onnxruntime:
fp32 and int8 (decoder weights), side by side in one run. (An int8 encoder is not offered: Flickr8k val
CIDEr-D fell from 0.516 to 0.471 with it.)

    python benchmarks/onnx_runtime.py [--photos 200] [--repeats 3] [--batch1-photos 32]
        [--exports DIR] [--install-size] [--json OUT]

Measured, per model, on the same photos (the first N Flickr8k val photos in sorted order, from
../shared/data/flickr8k; without them the example photos, repeated):
- cold start: the whole process `captioner caption PHOTO` (torch) vs `captioner caption --model DIR
  PHOTO`, wall time and the child's peak RSS (/usr/bin/time, else os.wait4), median of --repeats,
  the commands interleaved; and whether that process imported torch;
- N photos: the same commands given the N photos (one run each), wall time and peak RSS;
- warm, in this process: the models loaded and warmed up, then `generate` over the photos at
  batch 32 (all N) and batch 1 (the first --batch1-photos: a per-photo rate; 0 = all N), in ms per
  photo, the models taking turns chunk by chunk so that the machine's noise falls on all alike;
  and the share of photos whose best caption is the torch model's;
- install size: --install-size builds an empty venv and one with requirements-runtime.txt + the
  project (--no-deps), and compares their site-packages (du -sb) with the installed size of the
  torch path's distributions in this environment (slow: off by default).

The exports are written to a temporary folder (or to --exports DIR/{fp32,int8}, kept and
reused when already there); exporting is not timed. Ratios are onnx / torch: below 1 is faster or
smaller.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import itertools
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from common import FLICKR8K, REPO, machine

EXAMPLES = REPO / "assets" / "examples"
BUNDLED = REPO / "assets" / "model" / "captioner-flickr8k.pt"
COLUMNS = {"torch": None, "onnx fp32": "fp32", "onnx int8": "int8"}
QUANTIZE = {"fp32": None, "int8": "int8"}
CAPTIONER = [sys.executable, "-m", "captioner"]
# not copied for the install: what git ignores, and .git
IGNORED = (
    ".git",
    "build",
    "dist",
    "runs",
    "site",
    "*.egg-info",
    "__pycache__",
    ".venv",
    ".hypothesis",
    ".pytest_cache",
)
TIME = shutil.which("time", path="/usr/bin")
# peak RSS without /usr/bin/time: argv[1] = the report file, argv[2:] = the command
WAIT4 = """import os, sys
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))  # kilobytes on Linux
sys.exit(os.waitstatus_to_exitcode(status))"""
# after the CLI has run: did the process import torch? (the export path must not)
PROBE = "import sys\nfrom captioner.cli import main\nmain(sys.argv[1:])\nprint('torch' in sys.modules)"


# ---- photos and exports ----------------------------------------------------------------------------
def val_photos(data: Path, n: int) -> tuple[list[str], str]:
    """The first n val photos (sorted file names) of the COCO-format Flickr8k split, else the examples."""
    ann = data / "captions_val.json"
    if ann.is_file():
        names = sorted(im["file_name"] for im in json.loads(ann.read_text())["images"])
        paths = [data / "images" / name for name in names[:n]]
        if paths and all(p.is_file() for p in paths):
            if len(paths) == n:
                return [str(p) for p in paths], f"the first {n} Flickr8k val photos ({data})"
            cycled = list(itertools.islice(itertools.cycle(map(str, paths)), n))
            return cycled, f"the {len(paths)} Flickr8k val photos ({data}) repeated to {n}"
        print(f"{data / 'images'}: val photos missing; using the example photos, repeated, instead")
    else:
        print(f"{ann}: not found (no Flickr8k); using the example photos, repeated, instead")
    examples = sorted(str(p) for p in EXAMPLES.glob("*.jpg"))
    return list(itertools.islice(itertools.cycle(examples), n)), f"{len(examples)} example photos repeated to {n}"


def make_exports(root: Path) -> dict[str, Path]:
    """root/{fp32,int8}, exported from the bundled model unless already there."""
    out = {}
    for name, quantize in QUANTIZE.items():
        d = out[name] = root / name
        if (d / "captioner.json").is_file():
            continue
        cmd = [*CAPTIONER, "export", "--out", str(d), "--quiet"] + (["--quantize", quantize] if quantize else [])
        print(f"exporting {name} to {d} (not timed)", flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)  # the quantizer's warnings: shown only on failure
        if r.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    return out


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


# ---- whole processes -----------------------------------------------------------------------------
def timed_process(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and the process's peak RSS in MB: /usr/bin/time's %M, else a small Python parent's
    os.wait4 (not this process's: a child forked from it counts this process's memory as its own)."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as report:
        wrapper = [TIME, "-o", report.name, "-f", "%e %M"] if TIME else [sys.executable, "-c", WAIT4, report.name]
        t0 = time.perf_counter()
        subprocess.run([*wrapper, *cmd], stdout=subprocess.DEVNULL, check=True)
        wall = time.perf_counter() - t0
        peak_kb = int(report.read().split()[-1])
    return wall, peak_kb / 1024


def caption_cmd(export: Path | None, photos: list[str]) -> list[str]:
    return [*CAPTIONER, "caption", *(["--model", str(export)] if export else []), *photos]


def imports_torch(export: Path | None, photo: str) -> bool:
    args = ["caption", *(["--model", str(export)] if export else []), photo]
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1] == "True"


# ---- in this process ---------------------------------------------------------------------------------
def best_captions(results) -> list[str]:
    return [r[0].text if isinstance(r, list) else f"<error: {r}>" for r in results]


def warm_runs(models: dict, photos: list[str], batch_size: int, rounds: int = 4) -> tuple[dict, dict]:
    """ms per photo and the best captions of each model over photos, the models taking turns chunk by chunk
    (each chunk a whole number of batches)."""
    chunk = batch_size * max(1, math.ceil(len(photos) / (rounds * batch_size)))
    seconds, captions = dict.fromkeys(models, 0.0), {name: [] for name in models}
    for i in range(0, len(photos), chunk):
        for name, model in models.items():
            t0 = time.perf_counter()
            results = list(model.generate(photos[i : i + chunk], batch_size=batch_size))
            seconds[name] += time.perf_counter() - t0
            captions[name] += best_captions(results)
    return {name: 1000 * s / len(photos) for name, s in seconds.items()}, captions


def agreement(captions: dict) -> dict:
    ref = captions["torch"]
    return {name: 100 * sum(a == b for a, b in zip(ref, c)) / len(ref) for name, c in captions.items()}


# ---- install size ----------------------------------------------------------------------------------
def du(paths: list[Path]) -> int:
    """Bytes (apparent sizes, hard links once) of the paths together: `du -sbc`."""
    if not paths:
        return 0
    out = subprocess.run(["du", "-sbc", *map(str, paths)], capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1].split()[0])


def closure(names: list[str]) -> dict[str, md.Distribution]:
    """The installed distributions these requirements pull in, with the extras they ask for (torch's
    `cuda-toolkit[cublas,...]`), markers evaluated for this machine; ones not installed left out."""
    from packaging.requirements import Requirement

    seen: dict[str, md.Distribution] = {}
    done: set[tuple[str, str]] = set()
    todo = [(name, "") for name in names]  # (requirement, the extra it was asked for under)
    while todo:
        text, context = todo.pop()
        req = Requirement(text)
        if req.marker and not req.marker.evaluate({"extra": context}):
            continue
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        if key not in seen:
            try:
                seen[key] = md.distribution(req.name)
            except md.PackageNotFoundError:
                print(f"install size: {req.name} (wanted by {text!r}) is not installed here; left out")
                continue
        dist = seen[key]
        for extra in {"", *req.extras} - {e for k, e in done if k == key}:
            done.add((key, extra))
            todo += [(r, extra) for r in dist.requires or []]
    return seen


def installed_bytes(dists: dict[str, md.Distribution]) -> int:
    """du of the top-level entries of site-packages that the distributions' files live in (their
    package folders, .libs and .dist-info; scripts in bin/ left out, as in a venv's site-packages)."""
    tops = set()
    for dist in dists.values():
        base = Path(dist.locate_file(""))
        for f in dist.files or []:
            if not f.parts or f.parts[0] == "..":
                continue
            # a package's folder, else the file itself (modules and __pycache__ at the top are shared)
            top = base / f.parts[0] if len(f.parts) > 1 and f.parts[0] != "__pycache__" else base / f
            if top.exists():
                tops.add(top)
    return du(sorted(tops))


def requirement_names(path: Path) -> list[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("-")]


def install_sizes(export: Path, photo: str) -> dict:
    """MB: the torch-free runtime as a fresh venv adds it (site-packages minus an empty venv's), the
    torch path as installed here (requirements.txt's closure; the project's own dependencies'), each with
    the non-editable captioner package; and whether that venv captions a photo."""
    with tempfile.TemporaryDirectory(prefix="rtvenv") as tmp:
        empty, rt = Path(tmp, "empty"), Path(tmp, "runtime")
        for venv in (empty, rt):
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        print("install size: building a venv with requirements-runtime.txt (slow)", flush=True)
        # the working tree copied (pip builds a folder in place: REPO/build would change)
        tree = shutil.copytree(REPO, Path(tmp, "tree"), ignore=shutil.ignore_patterns(*IGNORED))
        for args in (["-r", str(REPO / "requirements-runtime.txt")], ["--no-deps", str(tree)]):
            r = subprocess.run([str(rt / "bin" / "python"), "-m", "pip", "install", *args], capture_output=True)
            if r.returncode:
                sys.exit(f"pip install {' '.join(args)} failed:\n{r.stdout.decode()}{r.stderr.decode()}")
        site = {v: next((v / "lib").glob("python*/site-packages")) for v in (empty, rt)}
        runtime = du([site[rt]]) - du([site[empty]])
        package = du([site[rt] / "captioner", *site[rt].glob("captioner-*.dist-info")])
        r = subprocess.run(
            [str(rt / "bin" / "captioner"), "caption", "--model", str(export), photo],
            capture_output=True,
            text=True,
            cwd=tmp,
        )
        works = r.returncode == 0 and bool(r.stdout.strip())
        if not works:
            print(f"the runtime venv failed to caption {photo}:\n{r.stderr}")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = installed_bytes(closure(requirement_names(REPO / "requirements.txt")))
    project = installed_bytes(closure(deps))
    mb = 1e6
    return {"runtime": runtime / mb, "requirements.txt": (reqs + package) / mb, "project": (project + package) / mb,
            "runtime captions": works}  # fmt: skip


# ---- the table -----------------------------------------------------------------------------------
def fmt(v, digits: int) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, str):
        return v
    return f"{v:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=200, help="N photos for the folder run and warm timings")
    ap.add_argument("--repeats", type=int, default=3, help="cold starts per command (median)")
    ap.add_argument("--batch1-photos", type=int, default=32, help="photos timed at batch 1 (0 = all N)")
    ap.add_argument("--exports", type=Path, help="folder for the exports (DIR/fp32, ...), reused when present")
    ap.add_argument("--data", type=Path, default=FLICKR8K, help="the Flickr8k folder (COCO-format captions_val.json)")
    ap.add_argument("--install-size", action="store_true", help="build venvs and measure install sizes (slow)")
    ap.add_argument("--json", type=Path, metavar="OUT", help="write the numbers here too")
    a = ap.parse_args()
    if a.photos < 1 or a.repeats < 1 or a.batch1_photos < 0:
        ap.error("--photos and --repeats take at least 1, --batch1-photos at least 0")
    photos, source = val_photos(a.data, a.photos)
    with tempfile.TemporaryDirectory(prefix="onnx-exports") as tmp:
        run(a, photos, source, make_exports(a.exports or Path(tmp)))


def run(a: argparse.Namespace, photos: list[str], source: str, exports: dict[str, Path]) -> None:
    import onnxruntime

    dirs = {col: exports[name] if name else None for col, name in COLUMNS.items()}
    rows: dict[str, dict] = {}
    load_before = os.getloadavg()[0]  # printed with the table: other work on the machine skews torch most

    def row(label: str, values: dict, digits: int = 2, ratio: bool = True) -> None:
        rows[label] = {"values": values, "digits": digits, "ratio": ratio}

    row("model files, MB", {c: size_mb(d or BUNDLED) for c, d in dirs.items()}, 1)

    # cold start, one photo: the commands interleaved, median of the repeats
    print(f"cold start: {a.repeats} x {len(dirs)} processes", flush=True)
    runs = {c: [] for c in dirs}
    for _ in range(a.repeats):
        for c, d in dirs.items():
            runs[c].append(timed_process(caption_cmd(d, photos[:1])))
    row("cold start, 1 photo: s", {c: statistics.median(w for w, _ in r) for c, r in runs.items()})
    row("cold start, 1 photo: peak RSS MB", {c: statistics.median(m for _, m in r) for c, r in runs.items()}, 0)
    row("cold start imports torch", {c: imports_torch(d, photos[0]) for c, d in dirs.items()}, ratio=False)

    print(f"{len(photos)} photos, whole process: {len(dirs)} processes", flush=True)
    runs = {c: timed_process(caption_cmd(d, photos)) for c, d in dirs.items()}
    row(f"{len(photos)} photos, whole process: s", {c: w for c, (w, _) in runs.items()})
    row(f"{len(photos)} photos, whole process: peak RSS MB", {c: m for c, (_, m) in runs.items()}, 0)

    print("warm, in this process: load, warm up, generate at batch 32 and 1", flush=True)
    from captioner import Captioner

    models, load_s = {}, {}
    for c, d in dirs.items():
        t0 = time.perf_counter()
        models[c] = Captioner.load(d, device="cpu")
        load_s[c] = time.perf_counter() - t0
        list(models[c].generate(photos[:4], batch_size=1))  # warm-up: first calls, both shapes
        list(models[c].generate(photos[:32], batch_size=32))
    row("load in process, s", load_s)
    b1 = photos[: a.batch1_photos or None]
    ms32, caps32 = warm_runs(models, photos, 32)
    ms1, caps1 = warm_runs(models, b1, 1)
    row(f"warm, batch 32: ms/photo ({len(photos)} photos)", ms32, 1)
    row(f"warm, batch 1: ms/photo ({len(b1)} photos)", ms1, 1)
    row("same best caption as torch, batch 32: %", agreement(caps32), 1, ratio=False)
    row("same best caption as torch, batch 1: %", agreement(caps1), 1, ratio=False)

    if a.install_size:
        s = install_sizes(dirs["onnx fp32"], photos[0])
        onnx = dict.fromkeys(list(dirs)[1:], s["runtime"])
        row("install MB: requirements.txt vs runtime", {"torch": s["requirements.txt"], **onnx}, 0)
        row("install MB: project deps vs runtime", {"torch": s["project"], **onnx}, 0)
        row("runtime venv captions", {"torch": None, **dict.fromkeys(onnx, s["runtime captions"])}, ratio=False)
    else:
        row("install MB", dict.fromkeys(dirs, "not measured"), ratio=False)

    cols = list(dirs)
    onnx_cols = cols[1:]
    print(f"\n{machine()}, onnxruntime {onnxruntime.__version__}, {os.cpu_count()} CPUs")
    print(f"photos: {source}; cold starts: median of {a.repeats}; peak RSS of the captioner process")
    load = f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    print(f"load average (1 min) of the machine: {load}; onnxruntime and torch use their default threads")
    head = cols + [f"{c.removeprefix('onnx ')}/torch" for c in onnx_cols]
    print(f"| measure | {' | '.join(head)} |\n|---|{'---|' * len(head)}")
    for label, r in rows.items():
        v, d = r["values"], r["digits"]
        cells = [fmt(v.get(c), d) for c in cols]
        for c in onnx_cols:
            ok = r["ratio"] and all(isinstance(v.get(k), float) and v.get(k) for k in ("torch", c))
            cells.append(f"{v[c] / v['torch']:.2f}x" if ok else "")
        print(f"| {label} | {' | '.join(cells)} |")

    if a.json:
        out = {
            "machine": machine(),
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
            "photos": source,
            "repeats": a.repeats,
            "batch1_photos": len(b1),
            "load_average": [load_before, os.getloadavg()[0]],
            "rows": {label: r["values"] for label, r in rows.items()},
        }
        a.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
