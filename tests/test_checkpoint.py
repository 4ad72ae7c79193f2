import os
import pickle

import pytest
import torch

from captioner.checkpoint import CheckpointError, atomic_write, load_checkpoint, save_checkpoint


def _payload():
    return {
        "config": {"encoder": "efficientnet_lite0"},
        "vocab": {"words": ["a"], "min_count": 1},
        "decoder": {"w": torch.arange(3.0)},
    }


def test_round_trip(tmp_path):
    save_checkpoint(tmp_path / "c.pt", _payload())
    ck = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(ck["decoder"]["w"], torch.arange(3.0)) and ck["config"]["encoder"] == "efficientnet_lite0"


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _payload())
    before = path.read_bytes()

    def broken(f):
        f.write(b"half a checkpoint")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pt"]


class _Evil:
    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    evil = _Evil()
    _Evil.marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": "captioner-checkpoint", "x": evil}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_wrong_files_are_refused_with_a_reason(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="junk.pt: refused"):
        load_checkpoint(tmp_path / "junk.pt")
    (tmp_path / "half.pt").write_bytes(b"PK\x03\x04" + b"\0" * 100)  # a truncated zip, as torch writes
    with pytest.raises(CheckpointError, match="half.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "half.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a captioner checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save({**_payload(), "format": "captioner-checkpoint", "format_version": 99}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(tmp_path / "future.pt")
