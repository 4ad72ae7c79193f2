import json
import shutil
import subprocess
import sys
from pathlib import Path

from nltk.translate.bleu_score import corpus_bleu

from captioner.cli import main
from captioner.data import load_coco
from captioner.vocab import tokenize


def _caption(capsys, *args):
    rc = main(["caption", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err.splitlines()


def test_train_then_caption_held_back_images_reaches_bleu4(trained_run, shapes, capsys):
    """End to end through the CLI: a model trained on generated COCO-format data describes unseen images."""
    rc, lines, err = _caption(
        capsys, shapes["test_images"], "--model", trained_run / "best.pt", "--json", "--device", "cpu"
    )
    assert rc == 0 and err == []
    results = [json.loads(l) for l in lines]
    test = load_coco(shapes["test_json"], shapes["test_images"])
    refs = {str(p): [tokenize(c) for c in caps] for p, caps in zip(test.paths, test.captions)}
    assert sorted(r["path"] for r in results) == sorted(refs)
    bleu4 = corpus_bleu([refs[r["path"]] for r in results], [tokenize(r["caption"]) for r in results])
    assert bleu4 >= 0.5, bleu4
    metrics = [json.loads(l) for l in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(1, 16))
    assert metrics[-1]["train_loss"] < 0.5 * metrics[0]["train_loss"]
    assert {"train_ppl", "val_loss", "val_ppl", "lr"} <= set(metrics[0])


def test_caption_files_folders_and_globs(trained_run, shapes, capsys):
    imgs = shapes["test_images"]
    one = sorted(imgs.glob("*.png"))[0]
    rc, lines, err = _caption(
        capsys, one, imgs, f"{imgs}/red_*.png", "--model", trained_run / "best.pt", "--beam-size", "3"
    )
    assert rc == 0 and err == []
    n_folder = len(list(imgs.glob("*.png")))
    n_red = len(list(imgs.glob("red_*.png")))
    assert len(lines) == 1 + n_folder + n_red
    path, caption = lines[0].split("\t")
    assert path == str(one) and caption


def test_json_nbest(trained_run, shapes, capsys):
    one = sorted(shapes["test_images"].glob("*.png"))[0]
    rc, lines, _ = _caption(capsys, one, "--model", trained_run / "best.pt", "--json", "--n-best", "3")
    rec = json.loads(lines[0])
    assert rc == 0 and set(rec) == {"path", "caption", "confidence", "low_confidence", "nbest", "tags"}
    assert rec["confidence"] is None and rec["low_confidence"] is False  # a checkpoint with no guidance state
    assert len(rec["tags"]) == 5
    assert len(rec["nbest"]) == 3 and rec["nbest"][0]["caption"] == rec["caption"]
    assert rec["nbest"][0]["score"] >= rec["nbest"][1]["score"] >= rec["nbest"][2]["score"]


def test_bad_inputs_are_reported_and_the_rest_still_captioned(trained_run, shapes, tmp_path, capsys):
    good = sorted(shapes["test_images"].glob("*.png"))[:2]
    broken = tmp_path / "broken photo é.jpg"
    broken.write_bytes(b"\xff\xd8\xff garbage")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    rc, lines, err = _caption(
        capsys,
        good[0],
        broken,
        tmp_path / "missing.jpg",
        empty,
        good[1],
        f"{tmp_path}/*.nothing",
        "--model",
        trained_run / "best.pt",
    )
    assert rc == 1
    assert [l.split("\t")[0] for l in lines] == [str(good[0]), str(good[1])]
    assert len(err) == 4
    assert any("broken photo é.jpg" in e for e in err) and any("missing.jpg: no such file" in e for e in err)
    assert any("empty.png" in e for e in err) and any("no files match" in e for e in err)
    assert all(e.startswith("captioner: ") and "Traceback" not in e for e in err)


def test_bad_model_path_is_one_line_and_exit_2(tmp_path, capsys):
    rc, lines, err = _caption(capsys, tmp_path, "--model", tmp_path / "nope.pt")
    assert rc == 2 and lines == [] and len(err) == 1 and "nope.pt: no such checkpoint file" in err[0]


def test_console_script_and_module_entry_point(trained_run, shapes):
    one = str(sorted(shapes["test_images"].glob("*.png"))[0])
    beside = Path(sys.executable).with_name("captioner")  # this environment's script, not another one's on PATH
    exe = str(beside) if beside.is_file() else shutil.which("captioner")
    assert exe, "console script `captioner` is not installed (pip install -e .)"
    assert "caption" in subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    r = subprocess.run(
        [sys.executable, "-m", "captioner", "caption", one, "--model", str(trained_run / "best.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(one + "\t")


def test_user_errors_are_one_line_and_bugs_show_their_traceback(trained_run, shapes, capsys, monkeypatch):
    one = sorted(shapes["test_images"].glob("*.png"))[0]
    # the user's mistakes: one line each, exit 2
    for args in (
        [one, "--sequence-dir", shapes["test_images"]],
        ["--attention-map", shapes["test_images"], one],
        ["--length-penalty", "-1", one],
    ):
        rc, lines, err = _caption(capsys, *args, "--model", trained_run / "best.pt")
        assert rc == 2 and len(err) == 1 and err[0].startswith("captioner: ") and "Traceback" not in err[0], err
    # a ValueError from deep inside (torch, say) is a bug, not bad input: traceback, and said so
    import captioner.beam

    def broken(*a, **kw):
        raise ValueError("Expected input batch_size (3) to match target batch_size (2).")

    monkeypatch.setattr(captioner.beam, "_constrain", broken)
    rc, lines, err = _caption(capsys, one, "--model", trained_run / "best.pt")
    text = "\n".join(err)
    assert rc == 1 and "Traceback" in text and "internal error" in err[-1] and "batch_size (3)" in err[-1]
