"""A tour of hostile inputs: every one gets a one-line message and a non-zero exit, nothing is
accepted silently, and nothing the user had is lost or overwritten."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from captioner.cli import main

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "assets" / "examples"


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("captioner: "), err
    return err


def test_a_closed_pipe_stops_captioning_quietly():
    # `captioner caption DIR | head -1`: the reader leaves after one line, the captioner must not complain
    proc = subprocess.Popen([sys.executable, "-m", "captioner", "caption", str(EXAMPLES), "--batch-size", "1",
                             "--beam-size", "1", "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
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
    data = ["--train-annotations", str(shapes["train_json"]), "--train-images", str(shapes["train_images"]),
            "--device", "cpu", "--quiet"]
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
