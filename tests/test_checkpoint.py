import os
import pickle
import warnings
import zipfile

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


def _torch_error(path) -> BaseException:
    """What torch itself raises loading `path` safely (the reason a refusal must pass on)."""
    try:
        with warnings.catch_warnings():  # (torch warns about foreign pickle protocols first)
            warnings.simplefilter("ignore")
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        return e
    raise AssertionError(f"{path} loaded")


def gpu_saved(path) -> None:
    """Make the checkpoint at `path` look saved from a GPU: its tensors' storages say cuda:0 (as
    torch writes them there), so loading it on a machine without one needs map_location."""
    with zipfile.ZipFile(path) as src:
        entries = {name: src.read(name) for name in src.namelist()}
    (pkl,) = [name for name in entries if name.endswith("/data.pkl")]
    assert entries[pkl].count(b"X\x03\x00\x00\x00cpu") == 1  # the storage's location, a protocol-2 string
    entries[pkl] = entries[pkl].replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for name, data in entries.items():
            dst.writestr(name, data)


def test_a_checkpoint_saved_on_a_gpu_loads_on_the_cpu(tmp_path):
    """Checkpoints trained on a GPU load on the CPU (the default), and where asked for: map_location."""
    save_checkpoint(tmp_path / "c.pt", _payload())
    gpu_saved(tmp_path / "c.pt")
    w = load_checkpoint(tmp_path / "c.pt")["decoder"]["w"]
    assert w.device.type == "cpu" and torch.equal(w, torch.arange(3.0))
    assert load_checkpoint(tmp_path / "c.pt", map_location="meta")["decoder"]["w"].is_meta


def test_the_refusal_passes_on_torchs_reason(tmp_path):
    """A refused file's message ends with torch's reason (the line after "WeightsUnpickler error:"),
    or, worded otherwise by another torch, the error's type: one line either way."""
    _Evil.marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": "captioner-checkpoint", "x": _Evil()}, f)
    reason = str(_torch_error(tmp_path / "evil.pt")).split("WeightsUnpickler error:", 1)[1]
    first = next(line.strip() for line in reason.splitlines() if line.strip())
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(tmp_path / "evil.pt")
    assert str(refused.value) == (
        f"{tmp_path / 'evil.pt'}: refused: not a plain tensors-and-JSON checkpoint; it may hold pickled "
        f"code, which is never run ({first})"
    )


def test_a_refusal_worded_otherwise_names_the_errors_type(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "c.pt", _payload())

    def other_wording(*args, **kwargs):
        raise pickle.UnpicklingError("a wording without the usual prefix")

    monkeypatch.setattr(torch, "load", other_wording)
    with pytest.raises(CheckpointError, match=r"c.pt: refused: .* never run \(UnpicklingError\)$"):
        load_checkpoint(tmp_path / "c.pt")


def test_safe_loading_does_not_rest_on_torchs_default(tmp_path, monkeypatch):
    """weights_only is asked for, not left to torch's default, which an environment can turn off."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    _Evil.marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": "captioner-checkpoint", "x": _Evil()}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_the_messages_name_the_file_and_the_fault(tmp_path):
    half = tmp_path / "half.pt"
    half.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    e = _torch_error(half)
    with pytest.raises(CheckpointError) as unreadable:
        load_checkpoint(half)
    assert str(unreadable.value) == (
        f"{half}: not a readable checkpoint: truncated or corrupt ({type(e).__name__}: {e})"
    )
    torch.save([torch.zeros(1)], tmp_path / "list.pt")  # a torch file, but not a dict
    with pytest.raises(CheckpointError) as other:
        load_checkpoint(tmp_path / "list.pt")
    assert str(other.value) == f"{tmp_path / 'list.pt'}: not a captioner checkpoint"
    torch.save({**_payload(), "format": "captioner-checkpoint", "format_version": 99}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError) as future:
        load_checkpoint(tmp_path / "future.pt")
    assert str(future.value) == (
        f"{tmp_path / 'future.pt'}: checkpoint format version 99 is not supported by this captioner (expects 1)"
    )
    with pytest.raises(CheckpointError) as missing:
        load_checkpoint(tmp_path / "none.pt")
    assert str(missing.value) == f"{tmp_path / 'none.pt'}: no such checkpoint file"


def test_a_checkpoint_lacking_a_required_part_is_refused_naming_each(tmp_path):
    torch.save({"format": "captioner-checkpoint", "format_version": 1, "config": {}}, tmp_path / "part.pt")
    with pytest.raises(CheckpointError) as lacking:
        load_checkpoint(tmp_path / "part.pt")
    assert str(lacking.value) == f"{tmp_path / 'part.pt'}: checkpoint lacks vocab, decoder"
    save_checkpoint(tmp_path / "whole.pt", _payload())
    assert set(load_checkpoint(tmp_path / "whole.pt")) == {"format", "format_version", "config", "vocab", "decoder"}
