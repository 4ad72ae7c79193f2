"""The on-disk feature cache: extract once, invalidate on change, resume after interruption."""

import json
import os

import numpy as np
import pytest
import torch

from captioner.data import load_coco
from captioner.encoders import build_encoder
from captioner.features import FeatureCache, encoder_key, extract_features
from captioner.images import ImageError
from captioner.training import Trainer, TrainOptions


@pytest.fixture(scope="module")
def lite0():
    return build_encoder()


@pytest.fixture
def images(shapes, tmp_path):
    """A private copy of 8 test images (so the tests may touch and break them)."""
    out = []
    for p in sorted(shapes["test_images"].glob("*.png"))[:8]:
        q = tmp_path / p.name
        q.write_bytes(p.read_bytes())
        out.append(q)
    return out


def _count_encodes(monkeypatch):
    import captioner.features.cache as F  # where the cache calls the encoder

    calls = []
    real = F.encode_pixels

    def counting(encoder, pixels, device, cut=None):
        calls.append(len(pixels))
        return real(encoder, pixels, device, cut)

    monkeypatch.setattr(F, "encode_pixels", counting)
    return calls


def test_cached_features_equal_in_memory_ones_and_are_extracted_once(lite0, images, tmp_path, monkeypatch):
    ref_pooled, _ = extract_features(lite0, images, "pooled", num_workers=0)
    ref_grid, _ = extract_features(lite0, images, "grid", num_workers=0)
    cache = FeatureCache(lite0, tmp_path / "cache")
    calls = _count_encodes(monkeypatch)
    assert cache.fill(images, batch_size=3, num_workers=0) == []
    assert sum(calls) == 8
    pooled = cache.load(images, "pooled")  # (N, D) fp16
    grid = cache.load(images, "grid")
    assert pooled.dtype == torch.float16 and pooled.shape == (8, 1280)
    assert torch.allclose(pooled.float(), ref_pooled, atol=2e-3, rtol=1e-2)
    assert grid.shape == (8, 49, 1280) and torch.equal(grid[torch.tensor([2, 5])], ref_grid[[2, 5]])
    assert torch.equal(grid[2:5], ref_grid[2:5])
    # a second run (another object, as in another process) extracts nothing
    again = FeatureCache(lite0, tmp_path / "cache")
    assert again.fill(list(reversed(images)) + images, num_workers=0) == [] and sum(calls) == 8
    assert torch.equal(again.load(images[::-1], "pooled"), pooled.flip(0))


def test_a_changed_image_is_extracted_again(lite0, images, tmp_path, monkeypatch):
    cache = FeatureCache(lite0, tmp_path / "cache")
    cache.fill(images, num_workers=0)
    before = cache.load(images, "pooled")
    images[3].write_bytes(images[0].read_bytes())  # new content, size and mtime
    os.utime(images[3], ns=(1, 10**18))
    calls = _count_encodes(monkeypatch)
    cache.fill(images, num_workers=0)
    assert sum(calls) == 1
    after = cache.load(images, "pooled")
    assert torch.allclose(after[3].float(), before[0].float(), atol=1e-2)  # same pixels, other batch
    assert not torch.allclose(after[3].float(), before[3].float(), atol=1e-2)
    assert torch.equal(after[[0, 1, 2, 4]], before[[0, 1, 2, 4]])  # untouched rows are read back as they were


def test_encoder_weights_and_preprocessing_are_part_of_the_key(lite0):
    other = build_encoder()
    assert encoder_key(other) == encoder_key(lite0)
    with torch.no_grad():
        other.trunk[0].weight[0, 0, 0, 0] += 1e-3
    assert encoder_key(other) != encoder_key(lite0)
    third = build_encoder()
    object.__setattr__(third.spec, "preprocess", type(third.spec.preprocess)(288, 256))
    assert encoder_key(third) != encoder_key(lite0)


def test_interrupted_extraction_resumes_where_it_stopped(lite0, images, tmp_path, monkeypatch):
    import captioner.features.cache as F  # where the cache calls the encoder

    class Crash(Exception):
        pass

    real, seen = F.encode_pixels, []

    def dies_on_third_batch(encoder, pixels, device, cut=None):
        if len(seen) == 2:
            raise Crash
        seen.append(len(pixels))
        return real(encoder, pixels, device)

    monkeypatch.setattr(F, "encode_pixels", dies_on_third_batch)
    cache = FeatureCache(lite0, tmp_path / "cache")
    with pytest.raises(Crash):
        cache.fill(images, batch_size=2, num_workers=0)
    # a crash can also leave rows written without their index lines: they must be dropped
    with open(cache.dir / "grid.f16", "ab") as f:
        f.write(b"\x13" * 1000)
    assert len((cache.dir / "index.jsonl").read_text().splitlines()) == 4
    monkeypatch.setattr(F, "encode_pixels", real)
    calls = _count_encodes(monkeypatch)
    cache = FeatureCache(lite0, tmp_path / "cache")
    cache.fill(images, batch_size=2, num_workers=0)
    assert sum(calls) == 4  # only the images that were not done
    fresh = FeatureCache(lite0, tmp_path / "fresh")
    fresh.fill(images, num_workers=0)
    resumed, whole = cache.load(images, "grid")[np.arange(8)], fresh.load(images, "grid")[np.arange(8)]
    assert torch.allclose(resumed.float(), whole.float(), atol=1e-2)  # batches of 2 vs one batch of 8


def test_bad_images_are_reported_and_not_cached(lite0, images, tmp_path):
    images[1].write_bytes(b"not a png")
    cache = FeatureCache(lite0, tmp_path / "cache")
    failed = cache.fill(images + [tmp_path / "gone.png"], num_workers=1)
    assert sorted(os.path.basename(e.path) for e in failed) == sorted([images[1].name, "gone.png"])
    assert all(isinstance(e, ImageError) for e in failed)
    good = [p for i, p in enumerate(images) if i != 1]
    assert cache.load(good, "pooled").shape == (7, 1280)
    index = [json.loads(l) for l in (cache.dir / "index.jsonl").read_text().splitlines()]
    assert len(index) == 7


def test_fine_tuned_encoders_are_not_cached():
    enc = build_encoder()
    enc.unfreeze_last(1)
    with pytest.raises(ValueError, match="cannot be cached"):
        FeatureCache(enc)


def test_cached_and_uncached_training_agree(shapes, tmp_path):
    train = load_coco(shapes["test_json"], shapes["test_images"])
    opts = TrainOptions(
        decoder="lstm", epochs=2, batch_size=16, hidden_size=64, embed_size=32, min_word_count=1, num_workers=0
    )
    losses = {}
    for name, use_cache in (("cached", True), ("uncached", False)):
        Trainer(
            train,
            None,
            tmp_path / name,
            opts,
            device="cpu",
            use_cache=use_cache,
            cache_dir=tmp_path / "cache",
        ).fit()
        losses[name] = [
            json.loads(l)["train_loss"] for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        ]
    assert losses["cached"] == pytest.approx(losses["uncached"], rel=2e-3)
    assert (tmp_path / "cache" / "features").is_dir() and not any((tmp_path / "uncached").glob("*.f16"))


def test_a_warm_cache_does_not_change_a_run(shapes, tmp_path):
    """Same seed, cold cache vs warm cache: identical weights (extraction must not touch the training RNG)."""
    train = load_coco(shapes["test_json"], shapes["test_images"])
    opts = TrainOptions(
        decoder="lstm", epochs=1, batch_size=16, hidden_size=32, embed_size=16, min_word_count=1, num_workers=1
    )
    for name in ("cold", "warm"):
        Trainer(train, None, tmp_path / name, opts, device="cpu", cache_dir=tmp_path / "cache").fit()
    from captioner.checkpoint import load_checkpoint

    a, b = (load_checkpoint(tmp_path / n / "last.pt")["decoder"] for n in ("cold", "warm"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_extract_features_cli_then_train_extracts_nothing(shapes, tmp_path, capsys):
    from captioner.cli import main

    cache = tmp_path / "cache"
    rc = main(
        [
            "extract-features",
            "--annotations",
            str(shapes["test_json"]),
            "--images",
            str(shapes["test_images"]),
            "--cache-dir",
            str(cache),
            "--quiet",
        ]
    )
    assert rc == 0
    [index] = cache.glob("features/*/index.jsonl")
    assert len(index.read_text().splitlines()) == 24
    before = index.stat().st_mtime_ns, (index.parent / "grid.f16").stat().st_size
    rc = main(
        [
            "train",
            "--train-annotations",
            str(shapes["test_json"]),
            "--train-images",
            str(shapes["test_images"]),
            "--out",
            str(tmp_path / "run"),
            "--epochs",
            "1",
            "--hidden-size",
            "32",
            "--min-word-count",
            "1",
            "--cache-dir",
            str(cache),
            "--quiet",
        ]
    )
    assert rc == 0 and (index.stat().st_mtime_ns, (index.parent / "grid.f16").stat().st_size) == before
    rc = main(["extract-features", str(tmp_path / "nothing-here.png"), "--cache-dir", str(cache), "--quiet"])
    assert rc == 1 and "nothing-here.png: no such file" in capsys.readouterr().err


def test_a_line_cut_by_a_crash_is_repaired_before_the_next_append(lite0, images, tmp_path):
    cache = FeatureCache(lite0, tmp_path / "cache")
    cache.fill(images[:4], num_workers=0)
    with open(cache.dir / "index.jsonl", "a", encoding="utf-8") as f:
        f.write('{"k": "/somewhere/img.png\\t123\\t4')  # the process died in the middle of a line
    cache = FeatureCache(lite0, tmp_path / "cache")
    assert cache.fill(images, num_workers=0) == []
    lines = (cache.dir / "index.jsonl").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == 9 and all(json.loads(l) for l in lines[:-1])
    fresh = FeatureCache(lite0, tmp_path / "fresh")
    fresh.fill(images, num_workers=0)
    again = FeatureCache(lite0, tmp_path / "cache")  # as another process reads it
    assert torch.equal(again.load(images, "pooled"), fresh.load(images, "pooled"))
    # a whole record whose newline was never written is cut too (the next append would glue onto it)
    with open(cache.dir / "index.jsonl", "a", encoding="utf-8") as f:
        f.write('{"k": "x", "r": 8}')
    images[0].write_bytes(images[1].read_bytes())
    os.utime(images[0], ns=(1, 10**18))  # changed: extracted again, appended
    assert again.fill(images, num_workers=0) == []
    assert all(json.loads(l) for l in (cache.dir / "index.jsonl").read_text().splitlines())
    now = FeatureCache(lite0, tmp_path / "cache").load(images[:1], "pooled").float()
    assert torch.allclose(now, fresh.load(images[1:2], "pooled").float(), atol=1e-2)  # batch of 1 vs of 8


def _fill_in_a_process(root: str, paths: list[str]) -> None:
    FeatureCache(build_encoder(), root).fill(paths, batch_size=2, num_workers=0)


@pytest.mark.slow  # launches processes
def test_two_processes_fill_one_cache_at_once(lite0, images, tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    paths = [str(p) for p in images]
    procs = [
        ctx.Process(target=_fill_in_a_process, args=(str(tmp_path / "cache"), part))
        for part in (paths[:6], paths[2:][::-1])
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == 0
    cache = FeatureCache(lite0, tmp_path / "cache")
    records = [json.loads(l) for l in (cache.dir / "index.jsonl").read_text().splitlines()]
    assert sorted(r["r"] for r in records) == list(range(8)) and len({r["k"] for r in records}) == 8  # each once
    fresh = FeatureCache(lite0, tmp_path / "fresh")
    fresh.fill(images, batch_size=2, num_workers=0)
    assert torch.allclose(cache.load(images, "pooled").float(), fresh.load(images, "pooled").float(), atol=1e-2)


def test_the_compute_dtype_is_part_of_the_key(lite0, tmp_path):
    assert encoder_key(lite0, torch.bfloat16) != encoder_key(lite0, torch.float32)
    cpu, gpu = FeatureCache(lite0, tmp_path), FeatureCache(lite0, tmp_path, torch.device("cuda"))
    assert cpu.dir != gpu.dir  # bf16 features from a GPU never stand in for fp32 ones, nor the reverse


# ---- at COCO's size: identities in one call per file, rows read on demand, the index read once ---------
def test_image_identities_equal_resolving_each_path(tmp_path, monkeypatch):
    from captioner.features.cache import image_identities, image_identity

    (tmp_path / "real").mkdir()
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "real" / name).write_bytes(b"x" * 7)
    (tmp_path / "linked").symlink_to(tmp_path / "real")  # a linked folder
    (tmp_path / "real" / "c.jpg").symlink_to(tmp_path / "real" / "b.jpg")  # a linked file
    monkeypatch.chdir(tmp_path)
    paths = ["real/a.jpg", tmp_path / "linked" / "b.jpg", tmp_path / "real" / "c.jpg", "real/../real/a.jpg"]
    assert image_identities(paths) == [image_identity(p) for p in paths]
    missing = image_identities([tmp_path / "gone.jpg"])[0]
    assert isinstance(missing, FileNotFoundError)


def test_put_stores_rows_that_read_back_and_fill_then_extracts_nothing(lite0, images, tmp_path, monkeypatch):
    cache = FeatureCache(lite0, tmp_path / "cache")
    grid = torch.randn(len(images), 49, 1280)
    cache.put(images, [grid[:3], grid[3:]])
    calls = _count_encodes(monkeypatch)
    assert cache.fill(images, num_workers=0) == [] and calls == []  # all cached already
    again = FeatureCache(lite0, tmp_path / "cache")
    rows = again.load(images, "grid")
    order = [5, 0, 7, 0]  # any order, repeats
    assert torch.equal(rows[order], grid[order].half())
    assert torch.equal(again.load(images, "pooled"), grid.mean(dim=1).half())
    lazy = again.load(images, "pooled", lazy=True)
    assert lazy.shape == (8, 1280) and torch.equal(lazy[2:4], grid[2:4].mean(dim=1).half())
    both = rows.join(again.load(images[:2], "grid"))
    assert len(both) == 10 and torch.equal(both[[9]], grid[[1]].half())
    with pytest.raises(ValueError, match="features for 3 of the 8"):
        cache.put(images, [grid[:3]])
    with pytest.raises(ValueError, match="shape"):
        cache.put(images[:1], [torch.zeros(1, 49, 1000)])


def test_the_index_is_read_incrementally_and_sees_other_writers(lite0, images, tmp_path):
    first = FeatureCache(lite0, tmp_path / "cache")
    first.put(images[:4], [torch.randn(4, 49, 1280)])
    second = FeatureCache(lite0, tmp_path / "cache")
    second.put(images[4:], [torch.randn(4, 49, 1280)])  # another process' rows
    first._read()
    assert first.index == second.index and sorted(first.index.values()) == list(range(8))
    index = first.dir / "index.jsonl"
    with open(index, "a") as f:
        f.write('{"k": "half a li')  # a crash mid-line: not read, then cut and written over
    first._read()
    assert len(first.index) == 8
    first.put(images[:1], [torch.randn(1, 49, 1280)])
    fresh = FeatureCache(lite0, tmp_path / "cache")
    fresh._read()
    first._read()
    assert first.index == fresh.index and len(fresh.index) == 8 and max(fresh.index.values()) == 8
