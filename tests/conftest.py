"""Shared fixtures: a generated shapes dataset and one model trained on it through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from captioner.synthetic import make_dataset

REPO = Path(__file__).resolve().parents[1]
FLICKR8K = REPO.parent / "shared" / "data" / "flickr8k"

# Small but real: trains in seconds from cached Lite0 features and captions held-back images well.
TRAIN_ARGS = (
    "--decoder lstm --epochs 15 --batch-size 32 --hidden-size 256 --embed-size 128 --min-word-count 1 "
    "--lr 2e-3 --dropout 0.2 --device cpu --quiet --no-calibrate"
).split()


def train_flags(shapes: dict[str, Path]) -> list[str]:
    """`captioner train` flags for the shapes training split."""
    return ["--train-annotations", str(shapes["train_json"]), "--train-images", str(shapes["train_images"])]


def val_flags(shapes: dict[str, Path]) -> list[str]:
    """`captioner train` flags for the held-back shapes as the val set."""
    return ["--val-annotations", str(shapes["test_json"]), "--val-images", str(shapes["test_images"])]


# Tests that use these fixtures train a model first: the `slow` tier (`pytest -m "not slow"` skips them).
SLOW_FIXTURES = {"trained_run", "captioner_model", "motion_models", "relation_models"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# The modules that test METEOR itself, or figures that include it, see the machine's METEOR as a user
# would (the official 1.5 where Java and pycocoevalcap are, as in CI). Everywhere else it is off, for
# the test and the processes it starts: the official METEOR starts a JVM in each process that scores
# (5-30 s on 2 cores), and a training or caption test does not test METEOR.
METEOR_MODULES = {"test_metrics.py", "test_claims.py"}


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Tests never touch the user's cache: one temporary feature cache for the whole session."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CAPTIONER_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    mp.setenv("CAPTIONER_METEOR", "off")
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _meteor_where_tested(request, monkeypatch):
    if request.node.path.name in METEOR_MODULES:
        monkeypatch.delenv("CAPTIONER_METEOR", raising=False)


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> dict[str, Path]:
    return make_dataset(tmp_path_factory.mktemp("shapes"), per_combo=5, test_per_combo=1, seed=0)


@pytest.fixture(scope="session")
def trained_run(shapes, tmp_path_factory) -> Path:
    """A run folder trained by `captioner train` on the shapes training split."""
    from captioner.cli import main

    out = tmp_path_factory.mktemp("run")
    rc = main(
        [
            "train",
            *train_flags(shapes),
            *val_flags(shapes),
            "--out",
            str(out),
            *TRAIN_ARGS,
        ]
    )
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def captioner_model(trained_run):
    from captioner import Captioner

    return Captioner.load(trained_run / "best.pt", device="cpu")
