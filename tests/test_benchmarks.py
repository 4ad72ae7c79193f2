"""Every benchmark that takes --model runs on every kind of checkpoint captioner writes; each smoke
run is checked on the numbers it reports (its --json output, and the table it prints against it):
counts that match the inputs, ratios that are the ratio of their parts, positive finite times."""

import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from captioner import Captioner
from captioner.encoders import build_encoder
from captioner.models import build_model
from captioner.paths import BUNDLED_MODEL
from captioner.training import TrainOptions
from captioner.vocab import Vocabulary

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
KINDS = {
    "show-and-tell": ("lstm", "none"),
    "attention": ("attention", "none"),
    "sequence, attention": ("attention", "gru"),
    "sequence, show-and-tell": ("lstm", "lstm"),
}


def _checkpoint(path: Path, decoder: str, temporal: str) -> Path:
    """A small checkpoint of one kind, random weights (the benchmarks time decoding, not quality)."""
    opts = TrainOptions(
        decoder=decoder,
        temporal=temporal,
        hidden_size=32,
        embed_size=16,
        attention_size=16,
        temporal_size=32,
        keypoints=4,
    )
    enc = build_encoder()
    vocab = Vocabulary([f"w{i}" for i in range(40)])
    config = {
        "encoder": opts.encoder,
        "decoder": decoder,
        "decoder_hparams": opts.decoder_hparams(),
        "temporal": opts.temporal_config(),
        "preprocess": enc.spec.preprocess.to_dict(),
        "fine_tune_encoder": 0,
    }
    Captioner(enc, build_model(config, len(vocab), enc.feature_dim), vocab, config, device="cpu").save(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpts")
    made = {name: _checkpoint(out / f"{i}.pt", *kind) for i, (name, kind) in enumerate(KINDS.items())}
    return made | {"bundled": BUNDLED_MODEL}


def _run(script: str, *args) -> str:
    r = subprocess.run(
        [sys.executable, str(BENCH / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=BENCH.parent,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def _table(out: str) -> dict[str, list[str]]:
    """The markdown table a benchmark printed: first cell -> the other cells."""
    rows = {}
    for line in out.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def _printed(cell: str, value: float, digits: int) -> None:
    """A printed cell ("**1.5x**", "12 ms/image", "0.52") shows `value` rounded to `digits` decimals."""
    number = re.fullmatch(r"\**([0-9.]+)(x| .*)?\**", cell)
    assert number, cell
    assert float(number[1]) == pytest.approx(value, abs=0.51 * 10**-digits), (cell, value)


def _times(*xs) -> None:
    assert all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in xs), xs


@pytest.mark.parametrize("kind", [*KINDS, "bundled"])
def test_beam_search_benchmark_runs_on_every_kind_of_checkpoint(checkpoints, kind, tmp_path):
    args = "--images 3 --repeats 1 --max-len 6".split()
    out = _run("beam_search.py", "--model", checkpoints[kind], *args, "--json", tmp_path / "out.json")
    r = json.loads((tmp_path / "out.json").read_text())
    sides = ("per-image loop", "batched")
    assert (r["images"], r["beam"], r["max_len"], r["repeats"]) == (3, 5, 6, 1)
    assert r["captions"] == dict.fromkeys(sides, 3)  # a caption per image from each side
    for side in sides:
        assert len(r["seconds"][side]) == 1 and r["best_s"][side] == min(r["seconds"][side])
        _times(r["best_s"][side])
        assert r["images_per_s"][side] == pytest.approx(3 / r["best_s"][side])
    assert r["speed_up"] == pytest.approx(r["best_s"]["per-image loop"] / r["best_s"]["batched"])
    assert r["same_best_caption"] in range(4) and r["same_best_caption_share"] == r["same_best_caption"] / 3
    table = _table(out)
    for label, side in (("per-image loop (classic tutorials)", sides[0]), ("batched (captioner)", sides[1])):
        _printed(table[label][0], r["best_s"][side], 2)
        _printed(table[label][1], r["images_per_s"][side], 1)
    _printed(table["**speed-up**"][0], r["speed_up"], 1)
    assert f"same best caption on {r['same_best_caption_share']:.0%} of images" in out


@pytest.mark.parametrize("kind", [*KINDS, "bundled"])
def test_caption_latency_benchmark_runs_on_every_kind_of_checkpoint(checkpoints, kind, tmp_path):
    cold = 1 if kind == "bundled" else 0  # one cold start (a `captioner caption` process) is enough
    args = ["--runs", "1", "--images", "2", "--cold-runs", str(cold), "--json", tmp_path / "out.json"]
    out = _run("caption_latency.py", "--model", checkpoints[kind], *args)
    r = json.loads((tmp_path / "out.json").read_text())
    assert (r["images"], r["runs"], len(r["cold_start_s"])) == (2, 1, cold)
    _times(*r["cold_start_s"], *r["s_per_image"]["batch"], *r["s_per_image"]["single"])
    assert all(len(r["s_per_image"][k]) == 1 for k in ("batch", "single"))
    ms = {k: 1000 * statistics.median(v) for k, v in r["s_per_image"].items()}
    assert r["median_ms_per_image"] == pytest.approx(ms)
    assert r["batching_speed_up"] == pytest.approx(ms["single"] / ms["batch"])
    table = _table(out)
    _printed(table["warm, batch of 2"][0], ms["batch"], 0)
    _printed(table["warm, one image at a time"][0], ms["single"], 0)
    _printed(table["batching speed-up"][0], r["batching_speed_up"], 1)
    assert ("cold start, 1 image (process start to output)" in table) == bool(cold)
    if cold:
        _times(r["peak_rss_mb"])
        _printed(table["cold start, 1 image (process start to output)"][0], r["cold_start_s"][0], 1)
        _printed(table["peak RSS of that process"][0], r["peak_rss_mb"], 0)
    else:
        assert r["peak_rss_mb"] is None


@pytest.mark.parametrize("kind", ["sequence, attention", "bundled"])
def test_serve_load_benchmark_runs(checkpoints, kind, tmp_path):
    out = _run("serve_load.py", "--model", checkpoints[kind], "--requests", "8", "--clients", "4",
               "--json", tmp_path / "out.json")  # fmt: skip
    r = json.loads((tmp_path / "out.json").read_text())
    assert (r["requests"], r["clients"], set(r["runs"])) == (8, 4, {"1", "4"})
    _times(r["server_rss_mb"])
    for run in r["runs"].values():
        lat = run["latencies_s"]
        assert len(lat) == 8  # every request answered
        _times(run["wall_s"], *lat)
        assert max(lat) <= run["wall_s"] and run["images_per_s"] == pytest.approx(8 / run["wall_s"])
        assert 1000 * min(lat) <= run["p50_ms"] <= 1000 * max(lat) and run["p50_ms"] <= run["p95_ms"]
    assert sum(r["runs"]["1"]["latencies_s"]) <= r["runs"]["1"]["wall_s"]  # one at a time: they do not overlap
    assert r["throughput_ratio"] == pytest.approx(r["runs"]["1"]["wall_s"] / r["runs"]["4"]["wall_s"])
    table = _table(out)
    for label, k in (("1 (one at a time)", "1"), ("4 concurrent", "4")):
        run = r["runs"][k]
        _printed(table[label][0], run["images_per_s"], 1)
        _printed(table[label][1], run["p50_ms"], 0)
        _printed(table[label][2], run["p95_ms"], 0)
    assert f"throughput ratio (concurrent / one at a time): {r['throughput_ratio']:.2f}x" in out


def test_cli_startup_benchmark_runs(tmp_path):
    out = _run("cli_startup.py", "--repeats", "1", "--json", tmp_path / "out.json")
    r = json.loads((tmp_path / "out.json").read_text())
    cases = ["python -c pass", "captioner --help", "captioner caption --help", "python -c 'import torch'"]
    assert r["repeats"] == 1 and list(r["seconds"]) == list(r["best_s"]) == list(r["x_help"]) == cases
    table = _table(out)
    for name in cases:
        assert len(r["seconds"][name]) == 1 and r["best_s"][name] == min(r["seconds"][name])
        _times(r["best_s"][name])
        assert r["x_help"][name] == pytest.approx(r["best_s"][name] / r["best_s"]["captioner --help"])
        _printed(table[name][0], r["best_s"][name], 2)
        _printed(table[name][1], r["x_help"][name], 2)
    assert r["x_help"]["captioner --help"] == 1


def test_onnx_runtime_benchmark_runs_and_its_exports_agree(tmp_path):
    """A small run of benchmarks/onnx_runtime.py: its numbers, read from --json, make sense, and the
    table shows them, with each ratio column the ratio of its row's values."""
    out = tmp_path / "onnx.json"
    printed = _run("onnx_runtime.py", "--photos", "4", "--repeats", "1", "--batch1-photos", "2",
                   "--exports", tmp_path / "exports", "--json", out)  # fmt: skip
    data = json.loads(out.read_text())
    rows, cols = data["rows"], ["torch", "onnx fp32", "onnx int8"]
    assert data["repeats"] == 1 and data["batch1_photos"] == 2
    digits = {  # the rows of a run with these arguments (4 photos, 2 at batch 1), and how each is printed
        "model files, MB": 1,
        "cold start, 1 photo: s": 2,
        "cold start, 1 photo: peak RSS MB": 0,
        "4 photos, whole process: s": 2,
        "4 photos, whole process: peak RSS MB": 0,
        "load in process, s": 2,
        "warm, batch 32: ms/photo (4 photos)": 1,
        "warm, batch 1: ms/photo (2 photos)": 1,
    }
    shares = {"same best caption as torch, batch 32: %": 4, "same best caption as torch, batch 1: %": 2}
    assert set(rows) == {*digits, *shares, "cold start imports torch", "install MB"}
    assert all(list(v) == cols for v in rows.values())
    assert rows["cold start imports torch"] == {"torch": True, "onnx fp32": False, "onnx int8": False}
    assert rows["install MB"] == dict.fromkeys(cols, "not measured")
    for label, n in shares.items():  # a share of n photos' captions; torch's own is all of them
        assert rows[label]["torch"] == 100.0 and all(v * n / 100 in range(n + 1) for v in rows[label].values())
    assert rows["same best caption as torch, batch 32: %"]["onnx fp32"] == 100.0
    assert rows["model files, MB"]["onnx int8"] < rows["model files, MB"]["onnx fp32"]
    table = _table(printed)
    for label, d in digits.items():
        _times(*rows[label].values())
        cells = table[label]
        for i, c in enumerate(cols):
            _printed(cells[i], rows[label][c], d)
        for i, c in enumerate(cols[1:]):  # the fp32/torch and int8/torch columns
            _printed(cells[len(cols) + i], rows[label][c] / rows[label]["torch"], 2)


def test_profile_benchmark_accounts_for_the_whole_photo(tmp_path):
    out = tmp_path / "profile.json"
    _run("profile_photo.py", "--photos", "4", "--batch", "4", "--repeats", "1", "--json", out)
    data = json.loads(out.read_text())
    fl = data["flops"]
    assert data["batch"] == 4 and data["repeats"] == 1 and set(data["paths"]) == {"torch", "onnx"}
    _times(fl["encoder"], fl["init"], fl["row"])
    # what FlopCounterMode counts for a whole decode = init per photo searched + head + counted rows x per-row FLOPs
    assert fl["decode_counted"] == pytest.approx(fl["decode_batch"], rel=1e-9) and fl["decode_batch"] > 0
    assert fl["searched"] >= 1  # photos searched per photo: more than 1 where a constrained re-search ran
    for path in data["paths"].values():
        counts = path["counts"]
        assert set(counts) == {"1", "4"} and (counts["1"]["batches"], counts["4"]["batches"]) == (4, 1)
        parts = {p["part"]: p for p in path["parts"]}
        assert list(parts) == ["prepare", "encoder", "decode", "init", "steps", "head", "rest", "photo"]
        for b, n in counts.items():
            assert n["searched"] >= 4 and n["searches"] >= n["batches"] and n["rows"] >= n["calls"] > 0
            ms = {k: p["ms"][b] for k, p in parts.items()}
            _times(ms["prepare"], ms["encoder"], ms["decode"], ms["init"], ms["steps"])
            assert ms["head"] >= 0 and ms["rest"] >= -1e-9  # parts of the decoding, timed inside it
            assert ms["photo"] == pytest.approx(ms["prepare"] + ms["encoder"] + ms["decode"])
            assert ms["decode"] == pytest.approx(ms["init"] + ms["steps"] + ms["head"] + ms["rest"])
            step = path["steps"][b]
            assert step["rows_per_call"] == pytest.approx(n["rows"] / n["calls"])
            assert step["ms_per_call"] == pytest.approx(ms["steps"] * 4 / n["calls"])  # ms/photo x photos / calls
            assert step["flop_per_call"] == pytest.approx(fl["row"] * n["rows"] / n["calls"])
        for p in parts.values():  # GFLOP/s at batch 4: the part's FLOPs over its time
            if p["gflop"] is not None:
                assert p["gflops"]["4"] == pytest.approx(p["gflop"] / (p["ms"]["4"] / 1e3))
        assert parts["encoder"]["gflop"] == pytest.approx(fl["encoder"] / 1e9)


def test_scale_benchmark_measures_every_phase_at_a_small_size(tmp_path):
    """benchmarks/scale.py at two small sizes (one decoder, a few steps, 2-process DDP): the data
    set has COCO's captions per photo, the cache the real shapes, and each phase reports numbers."""
    args = "--sizes 120,240 --val 30 --steps 3 --ddp-steps 2 --decoders lstm --json".split()
    out = json.loads(_run("scale.py", *args, "--work", tmp_path))
    grid = 49 * 1280 + 1280  # fp16 values per photo: the grid and the pooled vector
    assert (out["sizes"], out["val"], out["steps"]) == ([120, 240], 30, 3)
    assert out["cache"]["rows"] == 270 and out["cache"]["shape"] == [49, 1280]
    assert 270 * grid * 2 < out["cache"]["bytes"] < 270 * grid * 2 + 270 * 512  # + the index and meta
    _times(out["cache"]["seconds"])
    for size in (120, 240):
        r = out["at"][str(size)]
        # COCO's 5.0027 captions a photo: at 240 photos one photo (the first) has a sixth
        assert r["load"]["photos"] == size and r["load"]["captions"] == size * 5 + 1
        assert r["load"]["vocab"] > 4 and 0 < r["load"]["load_s"] <= r["load"]["load_vocab_s"]
        assert r["open"]["rows"] == size
        _times(r["open"]["open_s"])
        lstm = r["lstm"]
        assert 0 < lstm["import_s"] <= lstm["prepare_s"] <= lstm["startup_s"]  # times since the same start
        assert (lstm["world"], lstm["rank"], lstm["batch"]) == (1, 0, 64)
        assert lstm["steps_per_s"] > 0 and 0 < lstm["anon_mb"] <= lstm["rss_mb"]
        ranks = r["ddp"]["ranks"]
        assert [x["rank"] for x in ranks] == [0, 1] and all(x["world"] == 2 for x in ranks)
        _times(*(x["steps_per_s"] for x in ranks))
    assert out["at"]["240"]["lstm"]["val_photos"] == 30
    side = out["at"]["240"]["lstm_speed"]  # both sizes in one process: the ratio of their steps/s
    _times(*side["steps_per_s"].values())
    assert set(side["steps_per_s"]) == {"120", "240"} and side["vocab"] > 4
    assert side["ratio"] == pytest.approx(side["steps_per_s"]["120"] / side["steps_per_s"]["240"])
