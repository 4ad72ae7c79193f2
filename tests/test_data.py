import json
from pathlib import Path

import pytest
import torch

from captioner.data import CaptionDataset, DataError, collate, load_coco, load_karpathy
from captioner.vocab import Vocabulary


def _coco(tmp_path, n_images=3, missing=()):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    images, anns = [], []
    for i in range(n_images):
        images.append({"id": 10 + i, "file_name": f"im{i}.jpg", "width": 8, "height": 8, "license": 1})
        if i not in missing:
            (imgs / f"im{i}.jpg").write_bytes(b"x")
        for j in range(2):
            anns.append({"id": 100 + 2 * i + j, "image_id": 10 + i, "caption": f"  A  Dog number {i}.\n"})
    images.append({"id": 99, "file_name": "nocaption.jpg"})  # no annotations: left out
    anns.reverse()  # any order
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": anns}))
    return path, imgs


def test_coco_layout_groups_captions_per_image(tmp_path):
    path, imgs = _coco(tmp_path)
    c = load_coco(path, imgs)
    assert c.image_ids == [10, 11, 12]
    assert c.paths[1] == imgs / "im1.jpg"
    assert c.captions[2] == ["A Dog number 2.", "A Dog number 2."]  # whitespace collapsed
    assert len(c.items()) == 6  # one item per caption


def test_missing_images_fail_fast_or_are_skipped(tmp_path):
    path, imgs = _coco(tmp_path, n_images=8, missing=(1, 2, 3, 4, 5, 6))
    with pytest.raises(DataError) as e:
        load_coco(path, imgs)
    msg = str(e.value)
    assert "6 image file(s) missing" in msg and "im1.jpg" in msg and "and 1 more" in msg and "--skip-missing" in msg
    c = load_coco(path, imgs, skip_missing=True)
    assert c.image_ids == [10, 17] and c.skipped_missing == 6


def test_malformed_json_names_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [\n  {"id": 1,,}\n]}')
    with pytest.raises(DataError, match=r"bad.json: malformed JSON at line 2 column"):
        load_coco(bad, tmp_path)


def test_karpathy_split_selection(tmp_path):
    (tmp_path / "val2014").mkdir()
    for n in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / "val2014" / n).write_bytes(b"x")
    data = {
        "images": [
            {
                "filepath": "val2014",
                "filename": "a.jpg",
                "split": "train",
                "cocoid": 1,
                "sentences": [{"tokens": ["a", "cat"], "raw": "A cat."}],
            },
            {
                "filepath": "val2014",
                "filename": "b.jpg",
                "split": "restval",
                "cocoid": 2,
                "sentences": [{"tokens": ["a", "dog"]}],
            },
            {
                "filepath": "val2014",
                "filename": "c.jpg",
                "split": "val",
                "cocoid": 3,
                "sentences": [{"tokens": ["a", "cow"], "raw": "a cow"}],
            },
        ]
    }
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(data))
    train = load_karpathy(path, tmp_path, "train,restval")
    assert train.image_ids == [1, 2] and train.captions == [["A cat."], ["a dog"]]
    assert load_karpathy(path, tmp_path, "val").paths == [tmp_path / "val2014" / "c.jpg"]
    with pytest.raises(DataError, match="no images in split"):
        load_karpathy(path, tmp_path, "test")


def test_collate_pads_and_sorts_longest_first(tmp_path):
    path, imgs = _coco(tmp_path)
    c = load_coco(path, imgs)
    c.captions[0] = ["a dog", "a very very long dog caption"]
    vocab = Vocabulary.build([x for caps in c.captions for x in caps], min_count=1)
    ds = CaptionDataset(c, vocab, max_len=4)
    assert len(ds) == 6
    batch = collate([ds[0], ds[1], ds[2]])  # "a dog", the long one (clipped), "a dog number 1"
    assert batch.lengths.tolist() == [6, 6, 4]  # <start> + at most 4 words + <end>
    assert batch.captions.shape == (3, 6)
    assert batch.images[2].item() == 0 and vocab.decode(batch.captions[2]) == "a dog"
    assert batch.captions[2, 4:].tolist() == [0, 0]  # padded with <pad>
    assert (batch.captions[torch.arange(3), batch.lengths - 1] == vocab.end_id).all()
    assert "a very very long" in [vocab.decode(row) for row in batch.captions]


def _broken_coco(tmp_path):
    """A COCO file with one of each kind of problem, next to two good images."""
    from PIL import Image

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), (200, 0, 0)).save(imgs / name)
    (imgs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    images = [
        {"id": 1, "file_name": "a.png"},
        {"id": 2, "file_name": "b.png"},
        {"id": 2, "file_name": "c.png"},
        {"id": 3},
        {"id": 4, "file_name": "gone.png"},
        {"id": 5, "file_name": "broken.png"},
    ]
    anns = [
        {"id": 1, "image_id": 1, "caption": "a red square"},
        {"id": 1, "image_id": 2, "caption": "again id 1"},
        {"id": 2, "image_id": 2, "caption": "   "},
        {"id": 3, "image_id": 2, "caption": 42},
        {"id": 4, "image_id": 77, "caption": "who?"},
        {"id": 5, "image_id": 2},
        {"id": 6, "image_id": 2, "caption": "ok"},
        {"id": 7, "image_id": 4, "caption": "its file is gone"},
        {"id": 8, "image_id": 5, "caption": "unreadable"},
    ]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path, imgs


def test_malformed_entries_are_refused_with_a_summary_or_skipped(tmp_path):
    path, imgs = _broken_coco(tmp_path)
    with pytest.raises(DataError) as e:
        load_coco(path, imgs)
    msg = str(e.value)
    for part in (
        "1 duplicate image ids: 2",
        "1 image entries without an id or file_name: images[3]",
        "1 duplicate annotation ids: 1",
        "2 empty or non-string captions: annotations[2], annotations[3]",
        "1 annotations naming an unknown image_id: annotations[4] (77)",
        "1 annotations without image_id or caption: annotations[5]",
        "--skip-bad",
    ):
        assert part in msg, part
    c = load_coco(path, imgs, skip_bad=True, skip_missing=True)
    assert c.image_ids == [1, 2, 5] and c.captions[:2] == [["a red square"], ["ok"]] and c.skipped_missing == 1


def test_validate_data_lists_every_problem_with_counts(tmp_path, capsys):
    from captioner.cli import main

    path, imgs = _broken_coco(tmp_path)
    assert main(["validate-data", "--annotations", str(path), "--images", str(imgs), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: 4 images, 4 captions")
    assert "1 missing image files: gone.png (no such file)" in out and "1 unreadable images: broken.png" in out
    assert "1 duplicate annotation ids: 1" in out and "problems found" in out
    clean = tmp_path / "clean.json"
    clean.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
                "annotations": [
                    {"id": 1, "image_id": 1, "caption": "a red square"},
                    {"id": 2, "image_id": 2, "caption": "another one"},
                ],
            }
        )
    )
    assert main(["validate-data", "--annotations", str(clean), "--images", str(imgs), "--quiet"]) == 0
    assert capsys.readouterr().out.strip().endswith("ok")
    (tmp_path / "syntax.json").write_text('{"images": [],\n "annotations": [\n  {,}]}')
    assert main(["validate-data", "--annotations", str(tmp_path / "syntax.json"), "--images", str(imgs)]) == 2
    assert "malformed JSON at line 3 column 4" in capsys.readouterr().err


def test_training_refuses_a_broken_file_and_names_the_way_out(tmp_path, capsys):
    from captioner.cli import main

    path, imgs = _broken_coco(tmp_path)
    rc = main(
        [
            "train",
            "--train-annotations",
            str(path),
            "--train-images",
            str(imgs),
            "--out",
            str(tmp_path / "r"),
            "--quiet",
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "duplicate image ids" in err and "--skip-bad" in err


def test_unreadable_images_stop_training_or_are_left_out_with_skip_bad(tmp_path, capsys):
    from captioner.cli import main

    path, imgs = _broken_coco(tmp_path)
    args = [
        "train",
        "--train-annotations",
        str(path),
        "--train-images",
        str(imgs),
        "--skip-missing",
        "--epochs",
        "1",
        "--hidden-size",
        "16",
        "--embed-size",
        "8",
        "--min-word-count",
        "1",
        "--device",
        "cpu",
    ]
    assert main([*args, "--out", str(tmp_path / "r1"), "--quiet"]) == 2  # malformed entries: refused
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "r2"), "--skip-bad"]) == 0  # broken.png left out, trained on a, b
    err = capsys.readouterr().err
    assert "left out 1 item(s) with unreadable images" in err and "broken.png" in err


# ---- at COCO's size: captions tokenised once, held packed -------------------------------------------
def _old_encoding(vocab, caption, max_len):
    """What CaptionDataset held per caption before packing: vocab.encode, cut to max_len words."""
    ids = vocab.encode(caption)
    return ids if len(ids) <= max_len + 2 else ids[: max_len + 1] + [vocab.end_id]


def test_packed_captions_encode_as_the_vocabulary_does():
    import random

    from captioner.data import CaptionCorpus, CaptionDataset
    from captioner.vocab import Vocabulary, word_counts

    rng = random.Random(0)
    words = ["a", "dog", "Cat", "runs,", "the", "Mr.", "don't", "ice-cream", "!!", "雪", "3.5", "U.S."]
    captions = [[" ".join(rng.choices(words, k=rng.randint(0, 40))) + "." for _ in range(rng.randint(1, 6))]
                for _ in range(60)]  # fmt: skip
    corpus = CaptionCorpus([Path(f"{i}.jpg") for i in range(60)], list(range(60)), captions)
    flat = [c for caps in captions for c in caps]
    assert corpus.tokenized().counts() == word_counts(flat)
    vocab = Vocabulary.from_counts(corpus.tokenized().counts(), min_count=3)  # some words become <unk>
    data = CaptionDataset(corpus, vocab, max_len=12)
    assert len(data) == len(flat)
    for i, (item, caption) in enumerate(corpus.items()):
        assert data[i] == (item, _old_encoding(vocab, caption, 12))


def test_fingerprint_is_unchanged_by_hashing_in_pieces():
    """Runs resume only on the same data: the digest must stay what json.dumps gave before."""
    import hashlib
    import json

    from captioner.data import CaptionCorpus

    corpus = CaptionCorpus([Path("a.jpg"), Path("b.jpg")], [1, "x"], [["ä dog „quoted“"], ["a\ncat", "two"]])
    whole = json.dumps([["1", "x"], corpus.captions, None], ensure_ascii=False)
    assert corpus.fingerprint()["sha1"] == hashlib.sha1(whole.encode()).hexdigest()
