"""Captions in other scripts: words of any script are words; Chinese and Japanese, written without
spaces, are tokenised one character at a time; a Chinese dataset trains and captions in Chinese."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from captioner.metrics import normalize
from captioner.vocab import Vocabulary, tokenize

from .conftest import TRAIN_ARGS

COLORS = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色"}
SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
SIZES = {"small": "小", "big": "大"}
TEMPLATES = (
    "一个{size}的{color}{shape}",
    "白色背景上有一个{color}{shape}。",
    "图中是一个{size}{color}{shape}",
    "这是{color}的{shape}",
    "一个{color}的{shape}在白色背景上",
)


def test_words_of_every_script_are_kept():
    assert tokenize("Собака бежит по траве.") == ["собака", "бежит", "по", "траве"]
    assert tokenize("Ένας σκύλος τρέχει!") == ["ένας", "σκύλος", "τρέχει"]
    assert tokenize("한 남자가 자전거를 타고 있다") == ["한", "남자가", "자전거를", "타고", "있다"]
    assert tokenize("一只狗在草地上跑。") == ["一", "只", "狗", "在", "草", "地", "上", "跑"]
    assert tokenize("犬が走っている") == ["犬", "が", "走", "っ", "て", "い", "る"]
    assert tokenize("🙂 ☀ !!!") == [] and tokenize("A dog (brown) runs!") == ["a", "dog", "brown", "runs"]


def test_chinese_captions_round_trip_without_spaces_and_score_per_character():
    vocab = Vocabulary.build(["一只狗在草地上跑", "a dog runs 在 park"], min_count=1)
    assert vocab.decode(vocab.encode("一只狗在草地上跑")[1:]) == "一只狗在草地上跑"
    assert vocab.decode(vocab.encode("a dog runs 在 park")[1:]) == "a dog runs 在 park"
    assert normalize("一只狗在草地上跑") == normalize("一 只 狗 在 草地 上 跑") == tokenize("一只狗在草地上跑")


def _chinese(src: Path, dst: Path) -> Path:
    """The shapes split with its captions written in Chinese (the file names say what is drawn)."""
    data = json.loads(src.read_text())
    names = {i["id"]: i["file_name"] for i in data["images"]}
    data["annotations"] = []
    for image_id, name in names.items():
        color, shape, size, _ = name.split("_")
        for t in TEMPLATES:
            data["annotations"].append(
                {
                    "id": len(data["annotations"]) + 1,
                    "image_id": image_id,
                    "caption": t.format(color=COLORS[color], shape=SHAPES[shape], size=SIZES[size]),
                }
            )
    dst.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return dst


@pytest.mark.slow  # trains a model
def test_a_chinese_dataset_trains_and_captions_in_chinese(shapes, tmp_path, capsys):
    from captioner.cli import main

    train = _chinese(shapes["train_json"], tmp_path / "train_zh.json")
    test = _chinese(shapes["test_json"], tmp_path / "test_zh.json")
    assert main(["validate-data", "--annotations", str(train), "--images", str(shapes["train_images"]), "--quiet"]) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--train-annotations",
                str(train),
                "--train-images",
                str(shapes["train_images"]),
                "--out",
                str(run),
                *TRAIN_ARGS,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "caption",
                str(shapes["test_images"]),
                "--model",
                str(run / "best.pt"),
                "--beam-size",
                "3",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    right = 0
    for line in lines:
        path, caption = line.split("\t")
        color, shape, _, _ = Path(path).name.split("_")
        assert re.fullmatch(r"[\u4e00-\u9fff。]+", caption), caption  # Chinese, no spaces
        right += COLORS[color] in caption and SHAPES[shape] in caption
    assert len(lines) == 24 and right / len(lines) >= 0.8, lines
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(run / "best.pt"),
                "--annotations",
                str(test),
                "--images",
                str(shapes["test_images"]),
                "--beam-size",
                "3",
                "--device",
                "cpu",
                "--quiet",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["BLEU-4"] > 0.4 and report["CIDEr-D"] > 1.0, report
