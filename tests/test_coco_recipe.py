"""The COCO recipe (scripts/train_coco.sh) end to end on a tiny folder laid out as COCO 2017 is, and
the GPU plan (benchmarks/gpu_plan.py) at its small size, checked on its --json numbers."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from captioner import Captioner
from captioner.encoders import build_encoder
from captioner.synthetic import COLORS, SHAPES, SIZES, TEMPLATES, draw_shape

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _coco_split(root: Path, folder: str, n: int, first_id: int, rng: random.Random) -> dict:
    """`n` shape photos as JPEGs in root/folder, and their captions as COCO publishes them."""
    (root / folder).mkdir(parents=True)
    combos = [(c, s, z) for c in COLORS for s in SHAPES for z in SIZES]
    images, annotations = [], []
    for k in range(n):
        image_id = first_id + k
        color, shape, size = combos[(7 * k) % len(combos)]
        name = f"{image_id:012d}.jpg"
        draw_shape(color, shape, size, rng, px=160).save(root / folder / name, quality=90)
        images.append({"id": image_id, "file_name": name, "width": 160, "height": 160})
        for t in TEMPLATES:
            caption = t.format(color=color, shape=shape, size=size)
            annotations.append({"id": 10 * image_id + len(annotations), "image_id": image_id, "caption": caption})
    return {"info": {}, "licenses": [], "images": images, "annotations": annotations}


@pytest.fixture
def tiny_coco(tmp_path: Path) -> Path:
    root, rng = tmp_path / "coco", random.Random(0)
    (root / "annotations").mkdir(parents=True)
    for split, n, first in (("train2017", 8, 1), ("val2017", 5, 1000)):
        data = _coco_split(root, split, n, first, rng)
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(data))
    return root


def _recipe(coco: Path, out: Path, cache: Path, **env: str) -> subprocess.CompletedProcess:
    settings = {
        "COCO": str(coco),
        "OUT": str(out),
        "EPOCHS": "1",
        "BATCH": "8",
        "MIN_WORDS": "1",  # eight photos: their words are few
        "CAL_PHOTOS": "6",
        "BEAMS": "1",
        "QUIET": "1",
        "PYTHON": sys.executable,
        "CAPTIONER_CACHE_DIR": str(cache),
        "CAPTIONER_METEOR": "off",  # (the official METEOR starts a JVM per score: seconds, not under test here)
    }
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "train_coco.sh")],
        env={**os.environ, **settings, **env},
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_the_coco_recipe_trains_a_model_that_captions_and_a_second_run_has_nothing_to_do(tiny_coco, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    r = _recipe(tiny_coco, out, cache)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "train_coco: CPU:" in r.stdout and "--batch-size 8" in r.stdout  # no CUDA here: the CPU settings
    model = out / "captioner-coco.pt"
    for made in ("xe/best.pt", "ft/best.pt", "decoding.json", "calibration_train.json", "val_scores.json"):
        assert (out / made).is_file(), made
    assert len(json.loads((out / "calibration_train.json").read_text())["images"]) == 6  # CAL_PHOTOS
    scores = json.loads((out / "val_scores.json").read_text())
    assert scores["images"] == 5 and scores["model"] == str(model)
    ckpt = torch.load(model, map_location="cpu", weights_only=True)
    assert ckpt["config"]["fine_tune_encoder"] == 2 and "guidance" in ckpt  # stage 2, calibrated
    tuned = json.loads((out / "decoding.json").read_text())
    assert {k: ckpt["config"]["decoding"][k] for k in tuned} == tuned  # tune's settings are the defaults
    text = Captioner.load(model, device="cpu").caption(sorted((tiny_coco / "val2017").glob("*.jpg"))[0])
    assert isinstance(text, str) and text.strip()

    # run again: every stage is done, so nothing is trained, tuned or written again
    stamp = model.stat().st_mtime_ns
    again = _recipe(tiny_coco, out, cache, DEVICE="cpu")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("nothing left to do") == 2  # both training stages, resumed
    assert model.stat().st_mtime_ns == stamp and "| beam |" not in again.stdout


def test_the_gpu_plan_adds_up(tmp_path):
    """benchmarks/gpu_plan.py at its small size: the FLOPs it counts agree with FlopCounterMode, and
    each estimate is the arithmetic the docs describe, from the measured numbers and the stated
    assumptions."""
    out = tmp_path / "plan.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_plan.py"), "--quick", "--threads", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    plan = json.loads(out.read_text())
    m, a, est = plan["measured"], plan["assumed"], plan["estimates"]
    peak = a["h100"]["bf16_flops"] * a["util_compute"]

    # the encoder's forward per photo, as FlopCounterMode counts it here
    encoder = build_encoder().to(memory_format=torch.channels_last)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        encoder(torch.randn(2, 3, 224, 224).contiguous(memory_format=torch.channels_last))
    per_photo = counter.get_total_flops() / 2
    assert m["encoder"]["flops_per_photo"] == pytest.approx(per_photo, rel=0.03)
    assert 0.5e9 < per_photo < 1.0e9  # Lite0 at 224 px: about 0.4 G multiply-adds
    assert 0 < m["encoder"]["below_cut_flops_per_photo"] < m["encoder"]["flops_per_photo"]

    for kind, step in m["steps"].items():
        assert step["flops"] > 0 and step["bytes"] > 0 and step["ops"] > 0 and step["cpu_s"] > 0, kind
        assert step["flops_per_word"] == pytest.approx(step["flops"] / step["words"])
    # fine-tuning runs the attention decoder and the top blocks: more FLOPs than the decoder alone
    assert m["steps"]["fine-tune"]["flops"] > m["steps"]["attention"]["flops"] > m["steps"]["lstm"]["flops"]
    assert m["host"]["attention"]["ops_per_word"] > 10 * max(m["host"]["lstm"]["ops_per_word"], 1)
    assert m["loaders"]["coco_dev"] is None or m["loaders"]["coco_dev"]["photos_per_s_per_core"] > 0

    for name, e in est["extraction"].items():
        gb = e["gpu_batch"]
        assert e["compute_floor_s_per_batch"] == pytest.approx(m["encoder"]["flops_per_photo"] * gb / peak), name
        assert e["device_s_per_batch"] >= e["compute_floor_s_per_batch"]
        host = m["encoder"]["ops_per_batch"] * (m["host"]["s_per_op"] + a["launch_s"])
        assert e["host_s_per_batch"] == pytest.approx(host)
        main = m["data_path"]["extraction_main_s_per_photo"]
        rate = gb / (max(e["device_s_per_batch"], e["host_s_per_batch"]) + main * gb)
        assert e["gpu_photos_per_s"] == pytest.approx(rate)
    for kind, per_batch in est["epochs"].items():
        for name, e in per_batch.items():
            assert e["compute_floor_s"] == pytest.approx(e["flops_per_step"] / peak), (kind, name)
            assert e["step_s"] == pytest.approx(e["read_s"] + max(e["device_s"], e["host_s"]))
            assert e["step_s"] > e["compute_floor_s"]
            assert e["steps"] == math.ceil(a["coco"]["train_captions"] / e["batch"])
            assert e["epoch_s"] == pytest.approx(e["steps"] * e["step_s"])
    sizes, coco = est["cache_bytes"], a["coco"]
    assert sizes["frozen_train"] == (49 * 1280 + 1280) * 2 * coco["train_photos"]  # the fp16 grid + pooled vector
    assert sizes["trunk_train_flip"] == 2 * 192 * 7 * 7 * 2 * coco["train_photos"]

    # the recipe's total is for the settings scripts/train_coco.sh uses on a GPU
    script = (ROOT / "scripts" / "train_coco.sh").read_text()
    recipe = est["recipe"]
    assert f"BATCH=${{BATCH:-{recipe['batch']}}}" in script and f"EPOCHS=${{EPOCHS:-{recipe['epochs']}}}" in script
    assert "FT_EPOCHS=${FT_EPOCHS:-$(((EPOCHS + 1) / 2))}" in script
    assert recipe["ft_epochs"] == (recipe["epochs"] + 1) // 2
    assert f"CAL_PHOTOS=${{CAL_PHOTOS:-{recipe['cal_photos']}}}" in script
    assert recipe["total_s"] == pytest.approx(
        recipe["stage1_s"] + recipe["stage2_s"] + recipe["tune_calibrate_extraction_s"]
    )
