"""The on-disk feature cache: extract once, invalidate on change, resume after interruption."""

import json
import os

import numpy as np
import pytest
import torch

from captioner.data import load_coco
from captioner.encoders import build_encoder
from captioner.features import CachedFeatures, FeatureCache, encoder_key, extract_features
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
    with pytest.raises(
        ValueError, match="^a fine-tuned encoder's features change while training: they cannot be cached$"
    ):
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
    (tmp_path / "top.jpg").write_bytes(b"y" * 3)
    monkeypatch.chdir(tmp_path)
    paths = ["real/a.jpg", tmp_path / "linked" / "b.jpg", tmp_path / "real" / "c.jpg", "real/../real/a.jpg", "top.jpg"]
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


# ---- the cache's files, byte for byte: a tiny encoder (16 px, 4x4 grid of 6), so each test takes ms -------
def _tiny_encoder(name: str = "tiny/enc v1.2", seed: int = 0):
    from captioner.encoders import Encoder, EncoderSpec
    from captioner.images import Preprocess

    torch.manual_seed(seed)
    trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=4), torch.nn.ReLU(), torch.nn.Conv2d(8, 6, 1))
    return Encoder(EncoderSpec(name, 6, Preprocess(resize=16, crop=16)), trunk, [trunk[0], trunk[2]])


@pytest.fixture
def tiny():
    return _tiny_encoder()


@pytest.fixture
def pngs(tmp_path):
    """8 small photos of random pixels, each different."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    out = []
    for i in range(8):
        p = tmp_path / "img" / f"p{i}.png"
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


def _lines(cache) -> list[dict]:
    return [json.loads(line) for line in (cache.dir / "index.jsonl").read_text().splitlines()]


def _sizes(cache) -> tuple[int, int]:
    return tuple((cache.dir / name).stat().st_size for name in ("grid.f16", "pooled.f16"))


def test_put_writes_exactly_the_rows_meta_and_index_lines_and_reads_them_back(tiny, pngs, tmp_path):
    from captioner.features.cache import image_identity

    cache = FeatureCache(tiny, tmp_path / "cache")
    assert cache.dir.name.startswith("tiny_enc_v1.2-") and cache.dir.parent == tmp_path / "cache" / "features"
    g = torch.randn(8, 16, 6)
    cache.put(pngs[:5], [g[:2], g[2:5]])
    meta = json.loads((cache.dir / "meta.json").read_text())
    assert meta == {"encoder": "tiny/enc v1.2", "shape": [16, 6], "dtype": "float16", "computed_in": "torch.float32"}
    assert _lines(cache) == [{"k": image_identity(p), "r": i} for i, p in enumerate(pngs[:5])]
    assert (cache.dir / "grid.f16").read_bytes() == g[:5].half().numpy().tobytes()
    assert (cache.dir / "pooled.f16").read_bytes() == g[:5].mean(dim=1).half().numpy().tobytes()
    # the same object appends after its own rows, and reads them without re-opening
    cache.put(pngs[5:], [g[5:]])
    assert [r["r"] for r in _lines(cache)] == list(range(8)) and _sizes(cache) == (8 * 96 * 2, 8 * 6 * 2)
    for reader in (cache, FeatureCache(tiny, tmp_path / "cache")):
        grid = reader.load(pngs[::-1], "grid")
        assert len(grid) == 8 and grid.shape == (8, 16, 6) and grid.row_bytes == 96 * 2
        assert torch.equal(grid[:], g.flip(0).half()) and torch.equal(grid[np.arange(8)], g.flip(0).half())
        assert torch.equal(grid[2], g[[5]].half()) and torch.equal(grid[6:], g[[1, 0]].half())
        assert torch.equal(grid[[7, 0, 7, 3]], g[[0, 7, 0, 4]].half())  # any order, repeats
        assert torch.equal(reader.load(pngs), g.mean(dim=1).half())  # pooled, in memory, by default
        assert reader.load([]).shape == (0, 6) and reader.load([], "grid")[:].shape == (0, 16, 6)  # no images
        lazy = reader.load(pngs, "pooled", lazy=True)
        assert isinstance(lazy, CachedFeatures) and lazy.shape == (8, 6)
        assert torch.equal(lazy[[4]], g[[4]].mean(dim=1).half())
    assert FeatureCache(tiny, tmp_path / "cache").shape is None  # read with the index, not before
    # the mirror images' rows (put with mirror=True) are other keys: the plain rows stay as they were
    cache.put(pngs[:2], [2 * g[:2]], mirror=True)
    reader = FeatureCache(tiny, tmp_path / "cache")
    assert torch.equal(reader.load(pngs[:2], "grid", mirror=True)[:], 2 * g[:2].half())
    assert torch.equal(reader.load(pngs, "grid")[:], g.half())


def test_the_default_root_is_the_cache_dir_and_an_unusable_root_is_refused(tiny, tmp_path, monkeypatch):
    from captioner.errors import OutputError

    monkeypatch.setenv("CAPTIONER_CACHE_DIR", str(tmp_path / "shared"))
    assert FeatureCache(tiny).dir.parent == tmp_path / "shared" / "features"
    (tmp_path / "file").write_text("x")
    with pytest.raises(
        OutputError, match=r"^feature cache: .* is a file, not a folder \(choose another --cache-dir, or --no-cache\)$"
    ):
        FeatureCache(tiny, tmp_path / "file")


def test_rows_and_a_torn_line_left_by_a_crash_are_cut_before_the_next_append(tiny, pngs, tmp_path):
    cache = FeatureCache(tiny, tmp_path / "cache")
    g = torch.randn(8, 16, 6)
    cache.put(pngs[:4], [g[:4]])
    good = (cache.dir / "index.jsonl").read_bytes()
    with open(cache.dir / "grid.f16", "ab") as f:
        f.write(b"\x13" * 300)  # a row and a half with no index line
    with open(cache.dir / "pooled.f16", "ab") as f:
        f.write(b"\x13" * 17)
    with open(cache.dir / "index.jsonl", "ab") as f:
        f.write(b'{"k": "x", "r": 4}')  # whole, but its newline never written: not read, then cut
    again = FeatureCache(tiny, tmp_path / "cache")
    again._read()
    assert sorted(again.index.values()) == [0, 1, 2, 3] and again._rows() == 4
    again.put(pngs[4:], [g[4:6], g[6:]])
    assert (cache.dir / "index.jsonl").read_bytes().startswith(good + b'{"k": "')  # written over the cut
    assert [r["r"] for r in _lines(cache)] == list(range(8)) and _sizes(cache) == (8 * 96 * 2, 8 * 6 * 2)
    fresh = FeatureCache(tiny, tmp_path / "cache")
    assert torch.equal(fresh.load(pngs, "grid")[:], g.half())
    assert torch.equal(fresh.load(pngs, "pooled"), g.mean(dim=1).half())
    # a repair with nothing to cut leaves the file as it is; no index file: nothing to repair
    before = (cache.dir / "index.jsonl").read_bytes()
    fresh._repair_index()
    assert (cache.dir / "index.jsonl").read_bytes() == before
    FeatureCache(tiny, tmp_path / "empty")._repair_index()
    assert not (FeatureCache(tiny, tmp_path / "empty").dir / "index.jsonl").exists()


def test_the_index_reader_skips_damaged_lines_and_restarts_on_a_replaced_or_cut_file(tiny, tmp_path):
    cache = FeatureCache(tiny, tmp_path / "cache")
    index = cache.dir / "index.jsonl"
    cache._read()
    assert cache.index == {} and cache.shape is None  # nothing there yet
    lines = [
        b'{"k": "a", "r": 0}',
        b"not json",
        b'{"key": "b", "r": 1}',  # KeyError
        b"[1, 2]",  # TypeError (a list)
        b'{"k": ["c"], "r": 2}',  # TypeError (unhashable)
        b'\xff\xfe{"k": "d", "r": 3}',  # not UTF-8
        b'{"k": "e", "r": 4}',
    ]
    index.write_bytes(b"\n".join(lines) + b"\n")
    cache._read()
    assert cache.index == {"a": 0, "e": 4} and cache._rows() == 5
    with open(index, "ab") as f:
        f.write(b'{"k": "f", "r": 5}\n{"k": "g", "r"')
    cache._read()  # only what was added, and only whole lines
    assert cache.index == {"a": 0, "e": 4, "f": 5}
    with open(index, "ab") as f:
        f.write(b": 6}\n")
    cache._read()
    assert cache.index == {"a": 0, "e": 4, "f": 5, "g": 6}
    # replaced by another file (another inode), longer than what was read: read from its start
    new = cache.dir / "new.jsonl"
    new.write_bytes(b"".join(b'{"k": "n%d", "r": %d}\n' % (i, i) for i in range(12)))
    os.replace(new, index)
    cache._read()
    assert cache.index == {f"n{i}": i for i in range(12)}
    # cut in place below what was read: read again from its start
    os.truncate(index, len(b'{"k": "n0", "r": 0}\n'))
    cache._read()
    assert cache.index == {"n0": 0}
    index.unlink()
    cache._read()
    assert cache.index == {} and cache._rows() == 0


def test_fill_keys_rows_by_identity_once_each_and_rekeys_a_changed_file(tiny, pngs, tmp_path, monkeypatch):
    from captioner.features.cache import MIRRORED, image_identity

    ref, _ = extract_features(tiny, pngs, "grid", num_workers=0)
    ref_mirrored, _ = extract_features(tiny, pngs, "grid", num_workers=0, mirror=True)
    cache = FeatureCache(tiny, tmp_path / "cache")
    calls = _count_encodes(monkeypatch)
    assert cache.fill([pngs[1], pngs[0], pngs[1], pngs[0]], batch_size=8, num_workers=0) == []
    assert calls == [2] and _lines(cache) == [{"k": image_identity(p), "r": i} for i, p in enumerate(pngs[1::-1])]
    assert cache.fill(pngs, batch_size=3, num_workers=0) == [] and calls == [2, 3, 3]
    assert cache.fill(pngs[:2], batch_size=3, num_workers=0, mirror=True) == [] and calls == [2, 3, 3, 2]
    assert [r["k"] for r in _lines(cache)[-2:]] == [image_identity(p) + MIRRORED for p in pngs[:2]]
    reopened = FeatureCache(tiny, tmp_path / "cache")
    assert torch.allclose(reopened.load(pngs, "grid")[:].float(), ref.float(), atol=1e-3)
    assert torch.allclose(reopened.load(pngs[:2], "grid", mirror=True)[:].float(), ref_mirrored[:2].float(), atol=1e-3)
    assert not torch.allclose(ref[:2].float(), ref_mirrored[:2].float(), atol=1e-2)
    with pytest.raises(KeyError):
        reopened.load(pngs[2:3], "grid", mirror=True)  # never cached
    # a changed file (same size: only its mtime differs) is another identity: extracted again, its row appended
    os.utime(pngs[3], ns=(1, 10**18))
    assert reopened.fill(pngs, num_workers=0) == [] and calls[-1] == 1
    assert _lines(cache)[-1] == {"k": image_identity(pngs[3]), "r": 10} and _sizes(cache) == (11 * 192, 11 * 12)
    assert torch.allclose(FeatureCache(tiny, tmp_path / "cache").load(pngs, "grid")[:].float(), ref.float(), atol=1e-3)


def test_fill_reports_each_kind_of_failure_and_keys_the_good_images_of_a_batch(tiny, pngs, tmp_path):
    ref, _ = extract_features(tiny, pngs, "grid", num_workers=0)
    pngs[2].write_bytes(b"not a png")
    paths = [pngs[0], tmp_path / "gone.png", pngs[1], pngs[2], pngs[0] / "x.png", *pngs[3:]]
    cache = FeatureCache(tiny, tmp_path / "cache")
    failed = cache.fill(paths, batch_size=3, num_workers=0)
    reasons = {os.path.basename(e.path): str(e) for e in failed}
    assert [os.path.basename(e.path) for e in failed][:2] == ["gone.png", "x.png"]  # found before any decoding
    assert set(reasons) == {"gone.png", "x.png", pngs[2].name}
    assert reasons["gone.png"] == f"{tmp_path / 'gone.png'}: no such file"
    assert reasons["x.png"] == f"{pngs[0] / 'x.png'}: unreadable (Not a directory)"
    good = [p for i, p in enumerate(pngs) if i != 2]
    assert len(_lines(cache)) == 7
    assert torch.allclose(cache.load(good, "grid")[:].float(), ref[[0, 1, 3, 4, 5, 6, 7]].float(), atol=1e-3)
    with pytest.raises(FileNotFoundError):
        cache.load([tmp_path / "gone.png"], "grid")
    with pytest.raises(FileNotFoundError):
        cache.put([tmp_path / "gone.png"], [torch.zeros(1, 16, 6)])


def test_put_and_append_refuse_rows_that_do_not_match(tiny, pngs, tmp_path):
    cache = FeatureCache(tiny, tmp_path / "cache")
    with pytest.raises(ValueError, match="^more feature rows than the 2 paths given$"):
        cache.put(pngs[:2], [torch.zeros(1, 16, 6), torch.zeros(2, 16, 6)])
    with pytest.raises(ValueError, match=r"^feature rows of shape \(16, 5\), the cache holds \(16, 6\)$"):
        cache.put(pngs[2:3], [torch.zeros(1, 16, 5)])
    with pytest.raises(ValueError, match="^features for 1 of the 2 paths given$"):
        cache.put(pngs[3:5], [torch.zeros(1, 16, 6)])
    with cache._appending() as append, pytest.raises(ValueError, match="^1 keys for 2 feature rows$"):
        append(["k"], torch.zeros(2, 16, 6))
    assert _sizes(FeatureCache(tiny, tmp_path / "cache")) == (2 * 192, 2 * 12)  # the rows given before the error


def test_a_writer_waits_while_another_holds_the_lock(tiny, pngs, tmp_path):
    import fcntl
    import threading

    cache = FeatureCache(tiny, tmp_path / "cache")
    writers = (lambda: cache.put(pngs[:1], [torch.randn(1, 16, 6)]), lambda: cache.fill(pngs[1:2], num_workers=0))

    def lines() -> int:
        return len(_lines(cache)) if (cache.dir / "index.jsonl").exists() else 0

    for n, write in enumerate(writers):
        with open(cache.dir / "lock", "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # another process is writing
            t = threading.Thread(target=write)
            t.start()
            t.join(0.5)
            assert t.is_alive() and lines() == n  # waiting, nothing written
        t.join(60)
        assert not t.is_alive() and lines() == n + 1  # written once the lock was let go


def test_fill_counts_the_images_it_extracts_on_a_progress_bar(tiny, pngs, tmp_path, monkeypatch):
    import captioner.features.cache as F

    bars = []

    class Bar:
        def __init__(self, **kw):
            self.kw, self.n = kw, 0
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            self.n += n

    monkeypatch.setattr(F, "progress", Bar)
    pngs[2].write_bytes(b"not a png")
    cache = FeatureCache(tiny, tmp_path / "cache")
    assert len(cache.fill([*pngs[:4], tmp_path / "gone.png"], batch_size=3, num_workers=0, desc="train")) == 2
    assert [(b.kw, b.n) for b in bars] == [({"total": 4, "desc": "train", "unit": "img"}, 4)]  # the gone one: none
    assert cache.fill(pngs[:2], num_workers=0) == [] and len(bars) == 1  # nothing to extract: no bar
    assert cache.fill(pngs[4:6], num_workers=0) == [] and (bars[1].kw, bars[1].n) == (
        {"total": 2, "desc": "features", "unit": "img"},
        2,
    )


def test_cached_features_read_whole_rows_or_say_the_file_was_cut(tmp_path):
    data = torch.randn(5, 3, 2).half()
    (tmp_path / "a.f16").write_bytes(data.numpy().tobytes())
    rows = CachedFeatures(tmp_path / "a.f16", (3, 2), np.array([4, 0, 2]))
    assert torch.equal(rows[np.int64(0)], data[[4]]) and torch.equal(rows[1:], data[[0, 2]])
    assert rows[[]].shape == (0, 3, 2) and rows[np.array([], dtype=np.int64)].shape == (0, 3, 2)
    both = rows.join(CachedFeatures(tmp_path / "a.f16", (3, 2), np.array([1])))
    assert both.shape == (4, 3, 2) and torch.equal(both[:], data[[4, 0, 2, 1]])
    for other in (
        CachedFeatures(tmp_path / "b.f16", (3, 2), np.array([1])),
        CachedFeatures(rows.path, (6,), rows.rows),
    ):
        with pytest.raises(ValueError, match="^only rows of the same cache file can be joined$"):
            rows.join(other)
    os.truncate(tmp_path / "a.f16", 4 * 6 * 2 + 1)  # the last row cut short
    assert torch.equal(rows[[1, 2]], data[[0, 2]])
    with pytest.raises(OSError, match=r"a.f16: row 4 is cut short \(the cache was damaged\)$"):
        rows[[1, 0]]


class _Wrapped(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


def test_encoder_key_names_the_encoder_and_hashes_names_weights_and_the_part_below_a_cut(tmp_path):
    import re

    enc = _tiny_encoder()
    assert re.fullmatch(r"tiny_enc_v1\.2-[0-9a-f]{16}", encoder_key(enc))
    assert re.fullmatch(r"tiny_enc_v1\.2-cut2-[0-9a-f]{16}", encoder_key(enc, cut=2))
    relu_first = _tiny_encoder()  # the same tensors in another layer order: another network
    relu_first.trunk = torch.nn.Sequential(torch.nn.ReLU(), enc.trunk[0], enc.trunk[2])
    assert encoder_key(relu_first) != encoder_key(enc)
    above = _tiny_encoder()
    with torch.no_grad():
        above.trunk[2].weight.add_(1)
    assert encoder_key(above, cut=2) == encoder_key(enc, cut=2) and encoder_key(above) != encoder_key(enc)
    assert encoder_key(above, cut=1) != encoder_key(enc, cut=2)
    wrapped = _tiny_encoder()  # a trunk that is no nn.Sequential (it cannot be cut): cached whole
    wrapped.trunk = _Wrapped(wrapped.trunk)
    assert re.fullmatch(r"tiny_enc_v1\.2-[0-9a-f]{16}", encoder_key(wrapped)) and wrapped.cut(1) is None
    assert FeatureCache(wrapped, tmp_path).dir.name == encoder_key(wrapped) != encoder_key(enc)
    above.trunk[2].weight.requires_grad_(True)  # fine-tuning above the cut: the trunk below it may be cached
    assert FeatureCache(above, tmp_path, cut=2).cut == 2
    with pytest.raises(
        ValueError, match="^a fine-tuned encoder's features change while training: they cannot be cached$"
    ):
        FeatureCache(above, tmp_path)


def test_a_cached_trunk_holds_no_pooled_rows_and_is_read_whatever_the_kind(pngs, tmp_path):
    enc = _tiny_encoder()
    cache = FeatureCache(enc, tmp_path / "cache", cut=2)
    assert cache.dir.name == encoder_key(enc, cut=2) != FeatureCache(enc, tmp_path / "cache").dir.name
    t = torch.randn(6, 8, 4, 4)
    cache.put(pngs[:3], [t[:3]])
    with open(cache.dir / "grid.f16", "ab") as f:
        f.write(b"\x13" * 100)
    cache = FeatureCache(enc, tmp_path / "cache", cut=2)
    cache.put(pngs[3:6], [t[3:]])
    assert _sizes(cache) == (6 * 128 * 2, 0)
    for kind in ("trunk", "grid", "pooled"):
        rows = FeatureCache(enc, tmp_path / "cache", cut=2).load(pngs[:6], kind)
        assert rows.shape == (6, 8, 4, 4) and torch.equal(rows[:], t.half())
    ref, _ = extract_features(enc, pngs[:2], "trunk", num_workers=0, cut=2)
    fresh = FeatureCache(enc, tmp_path / "fresh", cut=2)
    assert fresh.fill(pngs[:2], num_workers=0) == [] and _sizes(fresh) == (2 * 256, 0)
    assert torch.allclose(fresh.load(pngs[:2], "trunk")[:].float(), ref.float(), atol=1e-3)


def test_fill_runs_the_encoder_on_the_cache_device_channels_last_with_the_workers_asked(
    tiny, pngs, tmp_path, monkeypatch
):
    """The device and memory format (a GPU extraction runs on the GPU, channels-last for speed) and
    the decoding workers cannot be seen in the features on a CPU: they are seen where they are passed."""
    import captioner.features.cache as F

    moved, workers = [], []
    real_to, real_batches = tiny.to, F.prepared_batches

    def to(*args, **kwargs):
        moved.append((args, kwargs))
        return real_to(*args, **kwargs)

    def batches(paths, load, batch_size, num_workers=0):
        workers.append(num_workers)
        return real_batches(paths, load, batch_size, 0)  # no worker processes started in the test

    monkeypatch.setattr(tiny, "to", to)
    monkeypatch.setattr(F, "prepared_batches", batches)
    cache = FeatureCache(tiny, tmp_path / "cache", device=torch.device("cpu"))
    assert cache.fill(pngs[:3], num_workers=2) == [] and len(cache.load(pngs[:3])) == 3
    assert moved == [((torch.device("cpu"),), {"memory_format": torch.channels_last})] and workers == [2]


def test_the_encoder_key_hashes_the_preprocessing_settings_not_their_order(monkeypatch):
    """A cache made by a version that lists the settings in another order is still found (its
    features are the same); a changed setting is another key."""
    enc = _tiny_encoder()
    key = encoder_key(enc)
    cls, settings = type(enc.spec.preprocess), enc.spec.preprocess.to_dict()
    monkeypatch.setattr(cls, "to_dict", lambda self: dict(reversed(list(settings.items()))))
    assert list(enc.spec.preprocess.to_dict()) != list(settings) and encoder_key(enc) == key
    monkeypatch.setattr(cls, "to_dict", lambda self: {**settings, "resize": settings["resize"] + 1})
    assert encoder_key(enc) != key
