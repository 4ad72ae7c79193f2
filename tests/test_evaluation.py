"""`captioner evaluate` / `score` / `plot`, and validation-driven model selection in training."""

import json

import pytest
from PIL import Image

from captioner.checkpoint import load_checkpoint
from captioner.cli import main
from captioner.metrics import METRICS

from .conftest import train_flags, val_flags

SHAPES_ARGS = [
    "--decoder",
    "lstm",
    "--batch-size",
    "32",
    "--hidden-size",
    "128",
    "--embed-size",
    "64",
    "--min-word-count",
    "1",
    "--device",
    "cpu",
    "--quiet",
    "--dropout",
    "0.2",
]


def _run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _train_with_val(shapes, out, *extra):
    return main(
        [
            "train",
            *train_flags(shapes),
            *val_flags(shapes),
            "--out",
            str(out),
            *SHAPES_ARGS,
            *extra,
        ]
    )


def test_evaluate_prints_all_metrics_and_writes_coco_results(trained_run, shapes, tmp_path, capsys):
    rc, out, _ = _run(
        capsys,
        "evaluate",
        "--model",
        trained_run / "best.pt",
        "--annotations",
        shapes["test_json"],
        "--images",
        shapes["test_images"],
        "--beam-size",
        "3",
        "--results",
        tmp_path / "res.json",
        "--quiet",
    )
    report = json.loads(out)
    assert rc == 0
    assert set(METRICS) <= set(report) and report["METEOR_backend"] in ("official-1.5", "nltk", "unavailable")
    assert report["images"] == 24 and report["references"] == 120 and report["failed"] == 0
    assert report["CIDEr-D"] > 2.0 and report["BLEU-4"] > 0.5
    rows = json.loads((tmp_path / "res.json").read_text())
    assert len(rows) == 24 and len({r["image_id"] for r in rows}) == 24  # each image captioned once
    assert all(set(r) == {"image_id", "caption"} and r["caption"] for r in rows)

    rc, out, _ = _run(capsys, "score", "--results", tmp_path / "res.json", "--annotations", shapes["test_json"])
    rescored = json.loads(out)
    assert rc == 0 and all(rescored[k] == pytest.approx(report[k]) for k in METRICS if report[k] is not None)


def test_score_refuses_bad_results_files(shapes, tmp_path, capsys):
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps([{"image_id": 100000, "caption": "a"}, {"image_id": 100000, "caption": "b"}]))
    rc, _, err = _run(capsys, "score", "--results", dup, "--annotations", shapes["test_json"])
    assert rc == 2 and "image_id 100000 has more than one caption" in err
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps([{"image_id": 424242, "caption": "a red circle"}]))
    rc, _, err = _run(capsys, "score", "--results", unknown, "--annotations", shapes["test_json"])
    assert rc == 2 and "424242" in err and len(err.strip().splitlines()) == 1
    notlist = tmp_path / "obj.json"
    notlist.write_text("{}")
    rc, _, err = _run(capsys, "score", "--results", notlist, "--annotations", shapes["test_json"])
    assert rc == 2 and "JSON list" in err


@pytest.mark.slow  # trains several epochs with validation
def test_best_follows_the_selection_metric(shapes, tmp_path):
    assert _train_with_val(shapes, tmp_path / "cider", "--epochs", "4", "--lr", "1e-3") == 0
    log = [json.loads(l) for l in (tmp_path / "cider" / "metrics.jsonl").read_text().splitlines()]
    assert all(set(METRICS) <= set(r) for r in log)
    best_epoch = max(log, key=lambda r: (r["CIDEr-D"], -r["epoch"]))["epoch"]  # first epoch with the max
    assert load_checkpoint(tmp_path / "cider" / "best.pt")["epoch"] == best_epoch
    assert [r["best"] for r in log] == [
        r["epoch"] == best_epoch
        or (r["CIDEr-D"] > max([x["CIDEr-D"] for x in log if x["epoch"] < r["epoch"]], default=-1))
        for r in log
    ]

    assert (
        _train_with_val(shapes, tmp_path / "loss", "--epochs", "3", "--lr", "1e-3", "--select-metric", "val_loss") == 0
    )
    log = [json.loads(l) for l in (tmp_path / "loss" / "metrics.jsonl").read_text().splitlines()]
    best_epoch = min(log, key=lambda r: (r["val_loss"], r["epoch"]))["epoch"]
    assert load_checkpoint(tmp_path / "loss" / "best.pt")["epoch"] == best_epoch


def test_early_stopping_and_plateau_decay(shapes, tmp_path, capsys):
    """With a learning rate too small to change anything, CIDEr-D stops improving after epoch 1:
    the LR decays after lr-patience stalled epochs and the run stops after `patience` of them."""
    rc = _train_with_val(
        shapes,
        tmp_path,
        "--epochs",
        "10",
        "--optimizer",
        "sgd",
        "--lr",
        "1e-9",
        "--patience",
        "3",
        "--lr-patience",
        "1",
        "--lr-gamma",
        "0.5",
    )
    assert rc == 0
    log = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]  # epoch 1 best, then 3 epochs without improvement
    assert [r["best"] for r in log] == [True, False, False, False]
    assert [r["lr"] for r in log] == pytest.approx([1e-9, 1e-9, 1e-9, 5e-10])
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 4


def test_unknown_selection_metric_is_refused(shapes, tmp_path, capsys):
    rc = _train_with_val(shapes, tmp_path, "--epochs", "1", "--select-metric", "accuracy")
    err = capsys.readouterr().err
    assert rc == 2 and "unknown metric 'accuracy'" in err


def test_plot_writes_a_png_of_the_curves(trained_run, tmp_path, capsys):
    rc, out, _ = _run(capsys, "plot", trained_run, "--out", tmp_path / "curves.png")
    assert rc == 0 and out.strip() == str(tmp_path / "curves.png")
    with Image.open(tmp_path / "curves.png") as im:
        assert im.format == "PNG" and im.size == (1500, 400)  # three panels: loss, metrics, CIDEr-D
        assert sum(1 for n in im.convert("L").histogram() if n) > 20  # something was drawn
    rc, _, err = _run(capsys, "plot", tmp_path)
    assert rc == 2 and "no metrics.jsonl" in err
