"""A trained model gets tags, guidance and a confidence: `captioner train` calibrates best.pt at the end
of a run with val data (and says why when it cannot); `captioner calibrate` and `captioner tune` do
it by hand; their --help starts without torch."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from captioner.checkpoint import load_checkpoint
from captioner.cli import main

from .conftest import train_flags, val_flags

QUICK = (
    "--decoder lstm --epochs 2 --batch-size 32 --hidden-size 64 --embed-size 32 --min-word-count 1 "
    "--lr 2e-3 --device cpu --quiet"
).split()


@pytest.fixture(scope="module")
def calibrated_run(shapes, tmp_path_factory) -> Path:
    """A run folder made by `captioner train` with val data (a few seconds of training)."""
    out = tmp_path_factory.mktemp("calibrated_run")
    assert main(["train", *train_flags(shapes), *val_flags(shapes), "--out", str(out), *QUICK]) == 0
    return out


def _photo(shapes) -> str:
    return str(sorted(shapes["test_images"].glob("*.png"))[0])


@pytest.mark.slow
def test_a_model_trained_with_val_data_answers_with_tags_and_a_confidence(calibrated_run, shapes, capsys):
    best = load_checkpoint(calibrated_run / "best.pt")
    assert {"confidence_weight", "val_typicality", "person_weight"} <= set(best["guidance"])
    assert {"optimizer", "scheduler", "epoch", "best_score"} <= set(best)  # best.pt keeps its training state
    assert not load_checkpoint(calibrated_run / "last.pt").get("guidance")  # only best.pt is calibrated
    capsys.readouterr()
    assert main(["caption", _photo(shapes), "--model", str(calibrated_run / "best.pt"), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["tags"] and rec["confidence"] is not None and 0.0 <= rec["confidence"] <= 1.0


@pytest.mark.slow
def test_training_says_why_it_fits_no_confidence(shapes, tmp_path, caplog):
    """No val data: one line says why, and the model works as before (no guidance state)."""
    from captioner.data import load_coco
    from captioner.training import Trainer, TrainOptions

    train = load_coco(shapes["train_json"], shapes["train_images"])
    opts = TrainOptions(decoder="lstm", epochs=1, batch_size=32, hidden_size=16, embed_size=8, min_word_count=1)
    with caplog.at_level(logging.INFO, logger="captioner"):
        best = Trainer(train, None, tmp_path / "run", opts, device="cpu").fit()
    lines = [r.getMessage() for r in caplog.records if "no tags guidance or confidence fitted" in r.getMessage()]
    assert len(lines) == 1 and "no validation data" in lines[0]
    assert not load_checkpoint(best).get("guidance")
    # switched off: nothing fitted, nothing said
    val = load_coco(shapes["test_json"], shapes["test_images"])
    trainer = Trainer(train, val, tmp_path / "off", replace(opts, calibrate=False), "cpu")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="captioner"):
        best = trainer.fit()
    assert not load_checkpoint(best).get("guidance")
    assert not [r for r in caplog.records if "guidance" in r.getMessage()]


@pytest.mark.slow
def test_tune_then_calibrate_write_their_outputs(calibrated_run, shapes, tmp_path, capsys):
    from captioner import Captioner

    model = str(calibrated_run / "best.pt")
    val = ["--annotations", str(shapes["test_json"]), "--images", str(shapes["test_images"])]
    cache = ["--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--quiet"]
    grid = ["--beam-sizes", "1,2", "--length-penalties", "0", "--no-repeat-ngrams", "0,2"]
    tuned = tmp_path / "decoding.json"
    capsys.readouterr()
    assert main(["tune", "--model", model, *val, *grid, "--out", str(tuned), *cache]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| beam | length penalty |") and "CIDEr-D" in out[0]
    assert len([line for line in out[2:] if line.startswith("| ")]) == 4  # 2 beams x 2 n-gram settings
    assert out[-1].startswith("best by CIDEr-D: ")
    setting = json.loads(tuned.read_text())
    assert setting["beam_size"] in (1, 2) and setting["no_repeat_ngram"] in (0, 2)

    data = [
        *train_flags(shapes),
        "--val-annotations",
        str(shapes["test_json"]),
        "--val-images",
        str(shapes["test_images"]),
    ]
    written, plot = tmp_path / "calibrated.pt", tmp_path / "reliability.png"
    args = ["calibrate", "--model", model, *data, "--decoding", str(tuned), "--out", str(written), *cache]
    assert main([*args, "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "5-fold cross-validated" in out and "| confidence (bin mean) | acceptable |" in out
    assert plot.read_bytes().startswith(b"\x89PNG")
    loaded = Captioner.load(written, device="cpu")
    assert loaded.calibrated and {k: loaded.decoding[k] for k in setting} == setting
    text, tags, conf = loaded.caption(_photo(shapes), return_tags=True, return_confidence=True)
    assert text and tags and 0.0 <= conf <= 1.0

    # a decoding file that names no setting is refused in one line, and nothing is written
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"beam_width": 3}))
    args = ["calibrate", "--model", model, *data, "--decoding", str(bad), "--out", str(tmp_path / "x.pt"), *cache]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "beam_width" in err[0] and not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("command", ["calibrate", "tune"])
def test_help_starts_without_torch(command):
    code = (
        "import sys\n"
        "from captioner.cli import main\n"
        "try:\n"
        f"    main([{command!r}, '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"usage: captioner {command}" in r.stdout
