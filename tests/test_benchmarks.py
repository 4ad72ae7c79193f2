"""Every benchmark that takes --model runs on every kind of checkpoint captioner writes."""

import json
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


@pytest.mark.parametrize("kind", [*KINDS, "bundled"])
def test_beam_search_benchmark_runs_on_every_kind_of_checkpoint(checkpoints, kind):
    out = _run("beam_search.py", "--model", checkpoints[kind], "--images", "3", "--repeats", "1", "--max-len", "6")
    assert "**speed-up**" in out and "same best caption on" in out


@pytest.mark.parametrize("kind", [*KINDS, "bundled"])
def test_caption_latency_benchmark_runs_on_every_kind_of_checkpoint(checkpoints, kind):
    cold = "1" if kind == "bundled" else "0"  # one cold start (a `captioner caption` process) is enough
    out = _run("caption_latency.py", "--model", checkpoints[kind], "--runs", "1", "--images", "2", "--cold-runs", cold)
    assert "batching speed-up" in out and "decoder" in out and ("cold start" in out) == (kind == "bundled")


@pytest.mark.parametrize("kind", ["sequence, attention", "bundled"])
def test_serve_load_benchmark_runs(checkpoints, kind):
    out = _run("serve_load.py", "--model", checkpoints[kind], "--requests", "8", "--clients", "4")
    assert "throughput ratio" in out and "| 4 concurrent |" in out


def test_cli_startup_benchmark_runs():
    out = _run("cli_startup.py", "--repeats", "1")
    assert "| captioner --help |" in out and "| python -c 'import torch' |" in out


def test_onnx_runtime_benchmark_runs_and_its_exports_agree(tmp_path):
    """A small run of benchmarks/onnx_runtime.py: its numbers, read from --json, make sense."""
    out = tmp_path / "onnx.json"
    _run("onnx_runtime.py", "--photos", "4", "--repeats", "1", "--batch1-photos", "2",
         "--exports", tmp_path / "exports", "--json", out)  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert rows["cold start imports torch"] == {"torch": True, "onnx fp32": False, "onnx int8": False}
    assert rows["same best caption as torch, batch 32: %"]["onnx fp32"] == 100.0
    assert all(v > 0 for v in rows["warm, batch 32: ms/photo (4 photos)"].values())
    assert rows["model files, MB"]["onnx int8"] < rows["model files, MB"]["onnx fp32"]


def test_profile_benchmark_accounts_for_the_whole_photo(tmp_path):
    out = tmp_path / "profile.json"
    _run("profile_photo.py", "--photos", "4", "--batch", "4", "--repeats", "1", "--json", out)
    data = json.loads(out.read_text())
    assert data["flops"]["decode_counted"] == data["flops"]["decode_batch"] > 0  # counted rows x per-row FLOPs
    for path in data["paths"].values():
        ms = {p["part"]: p["ms"] for p in path["parts"]}
        assert set(ms) >= {"prepare", "encoder", "decode"}


def test_scale_benchmark_measures_every_phase_at_a_small_size(tmp_path):
    """benchmarks/scale.py at two small sizes (one decoder, a few steps, 2-process DDP): the data
    set has COCO's captions per photo, the cache the real shapes, and each phase reports numbers."""
    args = "--sizes 120,240 --val 30 --steps 3 --ddp-steps 2 --decoders lstm --json".split()
    out = json.loads(_run("scale.py", *args, "--work", tmp_path))
    grid = 49 * 1280 + 1280  # fp16 values per photo: the grid and the pooled vector
    assert out["cache"]["rows"] == 270 and out["cache"]["bytes"] > 270 * grid * 2
    for size in (120, 240):
        r = out["at"][str(size)]
        # COCO's 5.0027 captions a photo: at 240 photos one photo (the first) has a sixth
        assert r["load"]["photos"] == size and r["load"]["captions"] == size * 5 + 1
        assert r["open"]["rows"] == size
        assert r["lstm"]["steps_per_s"] > 0 and 0 < r["lstm"]["anon_mb"] <= r["lstm"]["rss_mb"]
        ranks = r["ddp"]["ranks"]
        assert [x["rank"] for x in ranks] == [0, 1] and all(x["world"] == 2 for x in ranks)
    assert out["at"]["240"]["lstm"]["val_photos"] == 30
