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


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Tests never touch the user's cache: one temporary feature cache for the whole session."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CAPTIONER_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


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
