"""Data-parallel training under torchrun, on CPUs with gloo: N processes with batch B take the
steps of one process with batch N*B, checkpoints move between process counts (and nodes), and a
failing rank ends the whole job with its reason instead of leaving the others waiting."""

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from captioner.checkpoint import load_checkpoint
from captioner.cli import main
from captioner.data import load_coco
from captioner.distributed import Dist
from captioner.encoders import build_encoder
from captioner.training import Trainer, TrainOptions

pytestmark = pytest.mark.slow  # launches training processes

HELPERS = Path(__file__).parent / "helpers"
# 600 training captions: a multiple of every global batch used here, so no rank gets padding
SMALL = (
    "--decoder lstm --hidden-size 64 --embed-size 32 --attention-size 32 --min-word-count 1 --dropout 0 "
    "--device cpu --quiet"
).split()
TIMEOUT = 240  # no test may hang: every launch is killed after this


def _data(shapes) -> list[str]:
    return ["--train-annotations", str(shapes["train_json"]), "--train-images", str(shapes["train_images"])]


def _torchrun(launch: list[str], target: list[str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, *target]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _train_n(n: int, args: list[str]) -> None:
    """`torchrun --standalone --nproc_per_node=n -m captioner train ARGS`, which must succeed."""
    r = _torchrun(["--standalone", f"--nproc_per_node={n}"], ["-m", "captioner", "train", *args])
    assert r.returncode == 0, r.stderr[-3000:]


def _two_nodes(args: list[str]) -> None:
    """The multi-node recipe on one machine: two torchrun agents (one process each) meeting at a
    c10d rendezvous, as two hosts would."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=captioner-test",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "captioner", "train", *args]
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=TIMEOUT) for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    assert all(p.returncode == 0 for p in nodes), [err[-3000:] for _, err in outs]


def _max_diff(a: Path, b: Path) -> float:
    da, db = load_checkpoint(a)["decoder"], load_checkpoint(b)["decoder"]
    return max((da[k] - db[k]).abs().max().item() for k in da)


def _epochs(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_ranks_shard_each_global_batch_and_reshuffle_every_epoch(shapes, tmp_path):
    """The sampler alone: rank r's batch i holds exactly its share of one process's batch i at
    twice the size; epochs are shuffled differently."""
    train = load_coco(shapes["train_json"], shapes["train_images"])
    opts = TrainOptions(decoder="lstm", epochs=1, batch_size=20, hidden_size=16, embed_size=8, min_word_count=1)
    trainer = Trainer(train, None, tmp_path, opts, device="cpu")
    dataset = trainer.train_data[0]

    def batches(epoch: int) -> list[list[int]]:  # caption indices of each batch
        return [list(b) for b in trainer._loader(dataset, True, epoch).batch_sampler]

    one = {e: batches(e) for e in (0, 1)}
    trainer.opts = replace(opts, batch_size=10)
    for epoch in (0, 1):
        shards = []
        for rank in (0, 1):
            trainer.dist = Dist(rank, 2)
            shards.append(batches(epoch))
        assert len(shards[0]) == len(shards[1]) == len(one[epoch]) == 30
        for a, b, whole in zip(*shards, one[epoch]):
            assert not set(a) & set(b) and sorted(a + b) == sorted(whole)
    assert one[0] != one[1]  # reshuffled per epoch
    assert sorted(sum(one[0], [])) == list(range(len(dataset)))  # every caption once


@pytest.mark.parametrize("decoder,optimizer", [("lstm", "adam"), ("attention", "momentum")])
def test_two_processes_take_the_steps_of_one_with_twice_the_batch(shapes, tmp_path, decoder, optimizer):
    """60 optimizer steps (2 epochs x 30) with captions of varying length: the 2-process run is
    normalised by the global batch's tokens, so it lands where one process with batch 2B does.
    (The attention decoder uses SGD+momentum here: Adam turns float-rounding differences of
    near-zero gradients into visible ones over many steps, which would only test rounding.)"""
    args = [*_data(shapes), *SMALL, "--epochs", "2", "--decoder", decoder, "--optimizer", optimizer]
    if optimizer == "momentum":
        args += ["--lr", "0.05"]
    _train_n(2, [*args, "--out", str(tmp_path / "two"), "--batch-size", "10"])
    assert main(["train", *args, "--out", str(tmp_path / "one"), "--batch-size", "20"]) == 0
    assert main(["train", *args, "--out", str(tmp_path / "half"), "--batch-size", "10"]) == 0

    assert _max_diff(tmp_path / "two" / "last.pt", tmp_path / "one" / "last.pt") < 1e-5
    assert _max_diff(tmp_path / "two" / "last.pt", tmp_path / "half" / "last.pt") > 1e-3  # the test can tell
    two, one = _epochs(tmp_path / "two"), _epochs(tmp_path / "one")
    assert [r["epoch"] for r in two] == [1, 2]  # one log line per epoch: rank 0 alone writes
    for a, b in zip(two, one):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)  # all-reduced over both ranks
    train = load_checkpoint(tmp_path / "two" / "last.pt")["config"]["train"]
    assert (train["world_size"], train["batch_size"]) == (2, 10)


def test_checkpoints_resume_across_process_counts_and_nodes(shapes, tmp_path):
    """2 processes -> 1 and 1 -> 2 nodes: the resumed run keeps the global batch (the per-process
    batch changes) and finishes exactly where an uninterrupted single-process run does."""
    args = [*_data(shapes), *SMALL]
    assert main(["train", *args, "--out", str(tmp_path / "straight"), "--batch-size", "20", "--epochs", "2"]) == 0

    _train_n(2, [*args, "--out", str(tmp_path / "a"), "--batch-size", "10", "--epochs", "1"])
    assert main(["train", *args, "--out", str(tmp_path / "a"), "--epochs", "2", "--resume"]) == 0

    assert main(["train", *args, "--out", str(tmp_path / "b"), "--batch-size", "20", "--epochs", "1"]) == 0
    _two_nodes([*args, "--out", str(tmp_path / "b"), "--epochs", "2", "--resume"])

    for run, world, batch in (("a", 1, 20), ("b", 2, 10)):
        ck = load_checkpoint(tmp_path / run / "last.pt")
        assert ck["epoch"] == 2 and [r["epoch"] for r in _epochs(tmp_path / run)] == [1, 2]
        assert (ck["config"]["train"]["world_size"], ck["config"]["train"]["batch_size"]) == (world, batch)
        assert _max_diff(tmp_path / run / "last.pt", tmp_path / "straight" / "last.pt") < 1e-5


@pytest.mark.parametrize("rank,step", [(1, 5), (0, 35)])
def test_a_failing_rank_ends_the_job_with_its_reason(shapes, tmp_path, rank, step):
    """Rank 1 mid-epoch, or rank 0 (which validates and saves) in epoch 2: the job exits non-zero
    within the timeout, the failing rank says why in one line, and the other says it stopped."""
    args = [*_data(shapes), *SMALL, "--out", str(tmp_path / "run"), "--batch-size", "10", "--epochs", "3"]
    r = _torchrun(
        ["--standalone", "--nproc_per_node=2"],
        [str(HELPERS / "failing_rank.py"), str(rank), str(step), *args],
        timeout=120,
    )
    assert r.returncode != 0
    assert f"captioner: rank {rank} of 2: failed: RuntimeError: injected failure at step {step}" in r.stderr
    other = 1 - rank
    # the other rank either noticed the closed connection or was stopped by torchrun (SIGTERM) first
    assert (
        f"captioner: rank {other} of 2: stopped: another process of this job went away" in r.stderr
        or f"captioner: rank {other} of 2: interrupted" in r.stderr
    ), r.stderr[-3000:]
    if step > 30:  # failed in epoch 2: epoch 1's checkpoint is intact and resumable
        assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1


def _small_coco(shapes, path: Path, images: int = 8) -> Path:
    """The first `images` training images with their captions (5 each): a quick epoch even on pixels."""
    coco = json.loads(Path(shapes["train_json"]).read_text())
    keep = {im["id"] for im in coco["images"][:images]}
    path.write_text(
        json.dumps(
            {
                "images": [im for im in coco["images"] if im["id"] in keep],
                "annotations": [a for a in coco["annotations"] if a["image_id"] in keep],
            }
        )
    )
    return path


def test_encoder_fine_tuning_runs_under_torchrun(shapes, tmp_path):
    """A fine-tuned encoder goes through the same DDP-wrapped step on 2 processes; rank 0 saves the
    trained blocks (self-critical under torchrun: the test below)."""
    data = [
        "--train-annotations",
        str(_small_coco(shapes, tmp_path / "small.json")),
        "--train-images",
        str(shapes["train_images"]),
        *SMALL,
        "--epochs",
        "1",
        "--batch-size",
        "4",
    ]
    _train_n(2, [*data, "--out", str(tmp_path / "ft"), "--fine-tune-encoder", "1"])
    trained = load_checkpoint(tmp_path / "ft" / "last.pt")["encoder"]
    packaged = build_encoder("efficientnet_lite0").state_dict()
    assert {k.split(".")[1] for k in trained} == {"9", "10"}  # only the fine-tuned block is saved
    changed = [k for k in trained if not torch.equal(trained[k], packaged[k])]
    assert changed and not any("running" in k for k in changed)  # it trained; BatchNorm statistics stayed frozen


# Self-critical training with each image's samples drawn from a generator seeded by that image's
# features: the same captions for an image on any rank and in any batch, so a 2-process step can
# be held to the 1-process step on the whole batch (sampling is random otherwise). Each rank saves
# its decoder after the run. argv: OUT TRAIN_JSON TRAIN_IMAGES INIT_FROM BATCH_SIZE
SCST_HELPER = """
import hashlib, sys
from pathlib import Path
import torch
from captioner import distributed
from captioner.data import load_coco
from captioner.training import Trainer, TrainOptions, objectives

drawn = objectives.sample

def per_image(decoder, features, n, max_len, suppress):
    parts = []
    for row in features:
        torch.manual_seed(int(hashlib.sha1(row.detach().cpu().numpy().tobytes()).hexdigest()[:8], 16))
        parts.append(drawn(decoder, row[None], n=n, max_len=max_len, suppress=suppress))
    T = max(p[0].size(1) for p in parts)
    return tuple(
        torch.cat([torch.cat([p[i], p[i].new_zeros(p[i].size(0), T - p[i].size(1))], 1) for p in parts])
        for i in range(3)
    )  # (pad, 0 log-prob and no mask past each image's longest sample)

objectives.sample = per_image
out, train_json, images, init, batch = sys.argv[1:6]
dist = distributed.init("cpu")
opts = TrainOptions(
    epochs=1, batch_size=int(batch), init_from=init, self_critical=True, scst_samples=3, scst_max_len=8,
    optimizer="sgd", lr=0.5, lr_schedule="constant", min_word_count=1,
)
trainer = Trainer(load_coco(train_json, images), None, out, opts, device="cpu", dist=dist)
trainer.fit()
torch.save(trainer.model.decoder.state_dict(), Path(out).parent / f"{Path(out).name}.rank{dist.rank}.pt")
distributed.shutdown()
"""


def test_self_critical_on_two_processes_takes_the_step_of_one_on_the_whole_batch(shapes, tmp_path):
    """Self-critical under DDP: 2 processes x 4 images take the SGD step of 1 process x 8 images
    (same images, same samples: the loss is normalised by the global batch's tokens and DDP averages
    the gradients), both ranks end with the same weights, the step moved them, and the logged loss
    and CIDEr-D are the whole batch's."""
    small = _small_coco(shapes, tmp_path / "small.json")
    data = ["--train-annotations", str(small), "--train-images", str(shapes["train_images"])]
    xe = ["train", *data, *SMALL, "--epochs", "2", "--batch-size", "8", "--lr", "5e-3"]
    assert main([*xe, "--out", str(tmp_path / "xe")]) == 0  # a start that samples some good captions
    helper = tmp_path / "scst_helper.py"
    helper.write_text(SCST_HELPER)
    init = str(tmp_path / "xe" / "best.pt")
    r = _torchrun(
        ["--standalone", "--nproc_per_node=2"],
        [str(helper), str(tmp_path / "two"), str(small), str(shapes["train_images"]), init, "4"],
    )
    assert r.returncode == 0, r.stderr[-3000:]
    one = [sys.executable, str(helper), str(tmp_path / "one"), str(small), str(shapes["train_images"]), init, "8"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # as torchrun sets for each of its processes
    r = subprocess.run(one, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]

    rank0, rank1, whole = (torch.load(tmp_path / f"{run}.pt") for run in ("two.rank0", "two.rank1", "one.rank0"))
    start = load_checkpoint(init)["decoder"]
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # the ranks never drift apart
    moved = max((whole[k] - start[k]).abs().max().item() for k in start)
    apart = max((rank0[k] - whole[k]).abs().max().item() for k in start)
    assert moved > 1e-3 and apart < 1e-6, (moved, apart)
    assert _max_diff(tmp_path / "two" / "last.pt", tmp_path / "one" / "last.pt") < 1e-6  # what rank 0 saved
    (two,), (one,) = _epochs(tmp_path / "two"), _epochs(tmp_path / "one")
    assert two["train_CIDEr-D"] > 0 and two["train_CIDEr-D"] == pytest.approx(one["train_CIDEr-D"], rel=1e-6)
    assert two["train_loss"] != 0 and two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5, abs=1e-7)


def test_a_rank_0_error_reaches_every_rank(shapes, tmp_path):
    """What rank 0 alone does (here: reading the checkpoint to resume) fails on every rank with
    the same one-line message, rather than leaving the others waiting for it."""
    r = _torchrun(
        ["--standalone", "--nproc_per_node=2"],
        ["-m", "captioner", "train", *_data(shapes), *SMALL, "--out", str(tmp_path / "none"), "--resume"],
        timeout=120,
    )
    assert r.returncode != 0
    for rank in (0, 1):
        line = next(l for l in r.stderr.splitlines() if l.startswith(f"captioner: rank {rank} of 2: "))
        assert "last.pt" in line
    assert "captioner/training/" not in r.stderr  # a message, not a worker's traceback


def test_torch_distributed_is_not_needed_for_one_process(shapes, tmp_path):
    """Without torchrun nothing joins a process group and the trainer is a single process."""
    train = load_coco(shapes["train_json"], shapes["train_images"])
    opts = TrainOptions(decoder="lstm", epochs=1, hidden_size=16, embed_size=8, min_word_count=1)
    trainer = Trainer(train, None, tmp_path, opts, device="cpu")
    assert not torch.distributed.is_initialized() and trainer.dist == Dist() and trainer.wrapped is trainer.core


def test_compile_trains_like_eager(shapes, tmp_path):
    """--compile (torch.compile of the attention decoder's per-word step) changes speed, not
    results: the same epoch in eager and compiled mode gives the same loss and weights (SGD, for
    the reason given in the 2-process test above)."""
    train = load_coco(shapes["train_json"], shapes["train_images"])
    opts = TrainOptions(
        epochs=1,
        batch_size=40,
        decoder="attention",
        hidden_size=32,
        embed_size=16,
        attention_size=16,
        dropout=0.0,
        min_word_count=1,
        optimizer="momentum",
        lr=0.05,
    )
    for name, compile in (("eager", False), ("compiled", True)):
        trainer = Trainer(train, None, tmp_path / name, opts, device="cpu", compile=compile)
        assert hasattr(trainer.model.decoder._advance, "_torchdynamo_orig_callable") == compile
        trainer.fit()
    assert _epochs(tmp_path / "compiled")[0]["train_loss"] == pytest.approx(
        _epochs(tmp_path / "eager")[0]["train_loss"], rel=1e-5
    )
    assert _max_diff(tmp_path / "compiled" / "last.pt", tmp_path / "eager" / "last.pt") < 1e-4


def test_shard_sampler_gives_distributed_samplers_order_index_for_index():
    """The epoch's shard is held as a tensor, not a list of ints: the same indices, or a resume or a
    comparison with an earlier run would see other batches."""
    from torch.utils.data import DistributedSampler

    from captioner.training.batches import ShardSampler

    for n in (1, 2, 5, 7, 64, 1001):  # padding: fewer items than ranks, uneven splits
        for world in (1, 2, 3, 8):
            for rank in range(world):
                for epoch in (0, 3):
                    ours = ShardSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=5)
                    torch_s = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=5)
                    ours.set_epoch(epoch)
                    torch_s.set_epoch(epoch)
                    got = list(ours)
                    assert got == list(torch_s) and all(type(i) is int for i in got)
