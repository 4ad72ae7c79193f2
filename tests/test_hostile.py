"""A tour of hostile inputs: every one gets a one-line message and a non-zero exit, nothing is
accepted silently, and nothing the user had is lost or overwritten."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from captioner.cli import main

from .conftest import train_flags

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "assets" / "examples"


def _one_line_error(capsys, out: str | None = None) -> str:
    """The one line on stderr; `out`, when given, is what stdout must hold."""
    captured = capsys.readouterr()
    err = captured.err
    assert out is None or captured.out == out, captured.out
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("captioner: "), err
    return err


def test_a_closed_pipe_stops_captioning_quietly():
    # `captioner caption DIR | head -1`: the reader leaves after one line, the captioner must not complain
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "captioner",
            "caption",
            str(EXAMPLES),
            "--batch-size",
            "1",
            "--beam-size",
            "1",
            "--device",
            "cpu",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert first.startswith(str(EXAMPLES).encode())
    assert err == "" and proc.returncode == 141


def test_dash_reads_image_paths_from_standard_input(capsys, monkeypatch):
    lines = f"{EXAMPLES / 'cat.jpg'}\n\n{EXAMPLES / 'nope.jpg'}\n{EXAMPLES / 'dog.png'}\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    assert main(["caption", "-", "--beam-size", "1", "--device", "cpu"]) == 1  # one path names no file
    out, err = capsys.readouterr()
    assert [l.split("\t")[0] for l in out.splitlines()] == [str(EXAMPLES / "cat.jpg"), str(EXAMPLES / "dog.png")]
    assert err.strip() == f"captioner: {EXAMPLES / 'nope.jpg'}: no such file"


@pytest.fixture
def read_only(tmp_path) -> Path:
    """A folder nothing can be written into: permission bits, or (for root, who ignores them) /sys."""
    import os
    import tempfile

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    for folder in (ro, Path("/sys")):
        try:
            os.close(tempfile.mkstemp(dir=folder)[0])
        except OSError:
            yield folder
            break
    else:
        pytest.skip("no read-only folder here (root, and /sys is writable)")
    ro.chmod(0o755)


def test_outputs_that_cannot_be_written_are_refused_first(shapes, tmp_path, read_only, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    data = [
        *train_flags(shapes),
        "--device",
        "cpu",
        "--quiet",
    ]
    for out in (read_only / "run", afile, afile / "run"):
        assert main(["train", *data, "--out", str(out)]) == 2
        assert str(out) in _one_line_error(capsys)
    assert afile.read_text() == "not a folder"
    ev = ["evaluate", "--annotations", str(shapes["test_json"]), "--images", str(shapes["test_images"]), "--quiet"]
    for results in (read_only / "r.json", tmp_path, afile / "r.json"):
        assert main([*ev, "--results", str(results)]) == 2
        err = _one_line_error(capsys)
        assert f"captioner: {results}: " in err and ".tmp" not in err
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 2.0, "best": true}\n')
    assert main(["plot", str(run), "--out", str(read_only / "c.png")]) == 2
    assert str(read_only / "c.png") in _one_line_error(capsys)
    (run / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 2.0, "best": true}\n{"epoch": 2, "tra')
    assert main(["plot", str(run)]) == 2
    assert "metrics.jsonl: line 2 is not JSON" in _one_line_error(capsys)


def test_saving_a_model_where_it_cannot_go_names_the_path(tmp_path, read_only):
    from captioner import Captioner
    from captioner.errors import OutputError

    model = Captioner.load(device="cpu")
    for bad in (tmp_path, read_only / "m.pt"):
        with pytest.raises(OutputError, match=f"^{bad}: "):
            model.save(bad)


@pytest.mark.parametrize(
    "flags",
    [
        ["--beam-size", "0"],
        ["--beam-size", "-1"],
        ["--max-len", "0"],
        ["--n-best", "0"],
        ["--min-len", "9", "--max-len", "3"],
        ["--length-penalty", "-1"],
        ["--batch-size", "0"],
        ["--no-repeat-ngram", "-2"],
    ],
)
def test_caption_refuses_nonsense_decoding_options(flags, capsys):
    assert main(["caption", str(EXAMPLES / "cat.jpg"), "--device", "cpu", *flags]) == 2
    _one_line_error(capsys, out="")


@pytest.mark.parametrize(
    "argv",
    [
        ["evaluate", "--batch-size", "0"],
        ["extract-features", "--num-workers", "-1"],
        ["validate-data", "--show", "-1"],
        ["validate-data", "--max-pixels", "0"],
        ["caption", "--n-best", "0"],
    ],
)
def test_counts_of_every_command_are_checked_first(argv, capsys, tmp_path):
    # checked before anything else: these would otherwise fail later, deep inside
    assert (
        main(
            [*argv, "--annotations", str(tmp_path / "a.json"), "--images", str(tmp_path)]
            if argv[0] != "caption"
            else [*argv, str(EXAMPLES / "cat.jpg")]
        )
        == 2
    )
    assert argv[1] in _one_line_error(capsys, out="")


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--patience", "-1"], "--patience"),
        (["--grad-clip", "-1"], "--grad-clip"),
        (["--grad-clip", "0"], "--grad-clip"),
        (["--max-caption-len", "0"], "--max-caption-len"),
        (["--select-metric", "FOO"], "FOO"),
        (["--epochs", "0"], "--epochs"),
        (["--dropout", "1"], "--dropout"),
        (["--lr", "0"], "--lr"),
        (["--min-word-count", "0"], "--min-word-count"),
        (["--min-word-count", "100000"], "--min-word-count 100000 leaves no words"),
    ],
)
def test_train_refuses_settings_that_cannot_train(shapes, tmp_path, capsys, flags, named):
    rc = main(
        [
            "train",
            *train_flags(shapes),
            "--out",
            str(tmp_path / "run"),
            "--device",
            "cpu",
            "--quiet",
            *flags,
        ]
    )
    assert rc == 2 and named in _one_line_error(capsys)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_datasets_that_cannot_train_are_refused_and_flagged(shapes, tmp_path, capsys):
    import json

    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"images": [], "annotations": []}))
    symbols = tmp_path / "symbols.json"
    data = json.loads(Path(shapes["train_json"]).read_text())
    for a in data["annotations"]:
        a["caption"] = "🙂 !!! ☀"
    symbols.write_text(json.dumps(data))
    base = ["train", "--train-images", str(shapes["train_images"]), "--device", "cpu", "--quiet"]
    assert main([*base, "--train-annotations", str(empty), "--out", str(tmp_path / "a")]) == 2
    assert "no captioned images to train on" in _one_line_error(capsys)
    assert (
        main(
            [
                *base,
                "--train-annotations",
                str(shapes["train_json"]),
                "--val-annotations",
                str(empty),
                "--val-images",
                str(shapes["train_images"]),
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 2
    )
    assert "no captioned images to validate on" in _one_line_error(capsys)
    assert main([*base, "--train-annotations", str(symbols), "--out", str(tmp_path / "c")]) == 2
    assert "hold no words" in _one_line_error(capsys)
    assert main(["validate-data", "--annotations", str(empty), "--images", str(tmp_path), "--quiet"]) == 1
    assert "no captioned images" in capsys.readouterr().out
    assert (
        main(["validate-data", "--annotations", str(symbols), "--images", str(shapes["train_images"]), "--quiet"]) == 1
    )
    out = capsys.readouterr().out
    assert f"{len(data['annotations'])} captions with no words" in out and "\nok" not in out


@pytest.fixture(scope="module")
def bundled():
    from captioner import Captioner

    return Captioner.load(device="cpu")


def test_api_refuses_nonsense_options(bundled):
    from captioner.errors import UsageError

    cat = EXAMPLES / "cat.jpg"
    for kwargs in (
        {"beam_size": 0},
        {"beam_size": -1},
        {"max_len": 0},
        {"min_len": 5, "max_len": 2},
        {"beam_size": 2.5},
        {"length_alpha": float("nan")},
        {"tag_boost": -1.0},
        {"suppress_unseen": float("inf")},
        {"tag_subject": "high"},
        {"errors": "bogus"},
        {"batch_size": 0},
    ):
        with pytest.raises(UsageError):
            bundled.caption(cat, **kwargs)
    for n in (0, 1.5, True):
        with pytest.raises(UsageError):
            bundled.caption_nbest(cat, n=n)
    assert len(bundled.caption_nbest(cat, n=2, beam_size=1)) == 2  # a beam narrower than n widens, as documented


def test_in_memory_pictures_are_checked_not_clamped(bundled):
    import numpy as np
    import torch
    from PIL import Image

    from captioner.images import ImageError

    rgb = np.asarray(Image.open(EXAMPLES / "cat.jpg").convert("RGB"))  # (H, W, 3) uint8, read-only
    want = bundled.caption(EXAMPLES / "cat.jpg", beam_size=1)
    as_tensor = torch.from_numpy(rgb.copy()).permute(2, 0, 1)
    assert bundled.caption(rgb, beam_size=1) == want  # numpy arrays, as PIL and OpenCV give them
    assert bundled.caption(as_tensor.float() / 255, beam_size=1) == want
    assert bundled.caption(as_tensor.long(), beam_size=1) == want
    bad = {
        "has no pixels": [Image.new("RGB", (0, 0)), torch.zeros(3, 0, 0), np.zeros((0, 5, 3), np.uint8)],
        "must lie in [0, 1]": [as_tensor.float(), torch.full((3, 8, 8), -0.5)],
        "NaN": [torch.full((3, 8, 8), float("nan"))],
        "must lie in 0..255": [as_tensor.long() * 2],
        "expected an RGB": [torch.zeros(4, 8, 8), np.zeros((8, 8, 4), np.uint8)],
    }
    for reason, items in bad.items():
        for item in items:
            with pytest.raises(ImageError, match=re.escape(reason)) as e:
                bundled.caption(item)
            assert e.value.path.startswith("<") and "array(" not in e.value.path and "tensor([" not in e.value.path
    got = bundled.caption([rgb, torch.zeros(3, 0, 0), EXAMPLES / "cat.jpg"], errors="skip", beam_size=1)
    assert got == [want, None, want]  # a bad item never costs the good ones


def test_resume_refuses_flags_and_data_that_contradict_the_run(shapes, tmp_path, capsys):
    import json

    from captioner.checkpoint import load_checkpoint

    run = tmp_path / "run"
    base = ["train", *train_flags(shapes),
            "--out", str(run), *"--decoder lstm --hidden-size 64 --embed-size 32 --min-word-count 1".split(),
            "--device", "cpu", "--quiet"]  # fmt: skip
    assert main([*base, "--epochs", "2"]) == 0
    capsys.readouterr()

    def log():
        return [json.loads(l)["epoch"] for l in (run / "metrics.jsonl").read_text().splitlines()]

    resume = ["train", "--train-images", str(shapes["train_images"]), "--out", str(run), "--resume",
              "--device", "cpu", "--quiet"]  # fmt: skip
    train = ["--train-annotations", str(shapes["train_json"])]
    assert main([*resume, *train, "--epochs", "3", "--lr", "0.1", "--decoder", "attention"]) == 2
    err = _one_line_error(capsys)
    assert "--lr 0.1 (it has 0.0004)" in err and "--decoder attention (it has lstm)" in err
    other = json.loads(Path(shapes["train_json"]).read_text())
    other["annotations"] = other["annotations"][::2]  # the same images, fewer captions
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main([*resume, "--train-annotations", str(tmp_path / "other.json"), "--epochs", "3"]) == 2
    assert "needs the run's own training data" in _one_line_error(capsys)
    assert main([*resume, *train, "--epochs", "1"]) == 2
    assert "has trained 2 epochs already" in _one_line_error(capsys)
    assert main([*resume, *train]) == 0  # the run's own --epochs 2: said, not silently done
    assert "nothing left to do" in _one_line_error(capsys)
    assert log() == [1, 2]
    assert main([*resume, *train, "--epochs", "3", "--num-workers", "0", "--decoder", "lstm"]) == 0  # agrees: fine
    assert log() == [1, 2, 3] and load_checkpoint(run / "last.pt")["config"]["train"]["lr"] == 4e-4
    data = ["--train-annotations", str(shapes["train_json"]), "--train-images", str(shapes["train_images"])]
    new_run = ["train", *data, "--out", str(tmp_path / "new"), "--device", "cpu", "--quiet"]
    assert main([*new_run, "--init-from", str(run / "last.pt"), "--decoder", "attention"]) == 2
    assert "--init-from" in _one_line_error(capsys)


def test_score_says_what_it_scored_and_reads_what_caption_writes(shapes, tmp_path, capsys):
    import json

    data = json.loads(Path(shapes["test_json"]).read_text())
    refs = {}
    for a in data["annotations"]:
        refs.setdefault(a["image_id"], a["caption"])
    names = {i["id"]: i["file_name"] for i in data["images"]}
    score = ["score", "--annotations", str(shapes["test_json"])]

    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert main([*score, "--results", str(empty)]) == 2
    assert "holds no captions" in _one_line_error(capsys)
    part = tmp_path / "part.json"
    part.write_text(json.dumps([{"image_id": k, "caption": c} for k, c in list(refs.items())[:3]]))
    assert main([*score, "--results", str(part)]) == 2
    assert f"captions for 3 of the {len(refs)} reference images" in _one_line_error(capsys)
    assert main([*score, "--results", str(part), "--allow-partial"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["reference_images"] == len(refs) and report["images"] == 3
    # `captioner caption --json` output: JSON Lines with paths under wherever the images are
    lines = tmp_path / "captions.jsonl"
    lines.write_text(
        "".join(
            json.dumps({"path": f"/elsewhere/{names[k]}", "caption": c, "nbest": []}) + "\n" for k, c in refs.items()
        )
    )
    assert main([*score, "--results", str(lines)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == len(refs) and report["BLEU-4"] == pytest.approx(1.0)  # each caption is a reference
    lines.write_text(lines.read_text() + "{broken\n")
    assert main([*score, "--results", str(lines)]) == 2
    assert f"line {len(refs) + 1} is not JSON" in _one_line_error(capsys)
    # references from a Karpathy split file, as `evaluate --karpathy-json` uses them
    karpathy = tmp_path / "dataset.json"
    karpathy.write_text(
        json.dumps(
            {
                "images": [
                    {"filepath": "test", "filename": names[k], "cocoid": k, "split": "test", "sentences": [{"raw": c}]}
                    for k, c in refs.items()
                ]
            }
        )
    )
    assert (
        main(["score", "--karpathy-json", str(karpathy), "--split", "test", "--results", str(part), "--allow-partial"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["BLEU-4"] == pytest.approx(1.0)


def test_every_flag_has_help_that_shows_its_default():
    import argparse

    from captioner.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in commands.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"captioner {name} {action.option_strings or action.dest}: no help text"
            shown = formatter._expand_help(action)
            if action.option_strings and action.default not in (None, False):
                assert "default" in shown, f"captioner {name} {action.option_strings[0]}: default not shown"
        sub.format_help()  # renders without error


def test_nothing_the_user_gave_is_overwritten(shapes, tmp_path, capsys):
    import shutil

    photo = tmp_path / "cat.png"
    shutil.copy(EXAMPLES / "dog.png", photo)
    before = photo.read_bytes()
    # the attention map of cat.png would be cat.png in the same folder: the photo is kept
    assert main(["caption", str(photo), "--attention-map", str(tmp_path), "--beam-size", "1", "--device", "cpu"]) == 1
    err = _one_line_error(capsys)
    assert "attention map not written" in err and photo.read_bytes() == before
    refs = tmp_path / "refs.json"
    shutil.copy(shapes["test_json"], refs)
    before = refs.read_bytes()
    assert (
        main(
            [
                "evaluate",
                "--annotations",
                str(refs),
                "--images",
                str(shapes["test_images"]),
                "--results",
                str(refs),
                "--quiet",
            ]
        )
        == 2
    )
    assert "would overwrite it" in _one_line_error(capsys) and refs.read_bytes() == before
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["extract-features", str(photo), "--cache-dir", str(afile), "--quiet", "--device", "cpu"]) == 2
    assert "--cache-dir" in _one_line_error(capsys) and afile.read_text() == "x"
