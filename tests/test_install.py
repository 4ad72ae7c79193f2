"""A normal (non-editable) install is complete: the wheel carries the bundled model, and the
`test` extra names everything the tests import."""

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "assets" / "examples" / "cat.jpg"


@pytest.mark.slow
def test_a_wheel_installed_outside_the_checkout_captions_with_the_bundled_model(tmp_path):
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(wheels)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    [wheel] = wheels.glob("captioner-*.whl")
    inst = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert inst.returncode == 0, inst.stderr[-2000:]
    image = elsewhere / "photo.jpg"
    image.write_bytes(EXAMPLE.read_bytes())
    env = {k: v for k, v in os.environ.items() if k not in ("CAPTIONER_MODEL", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)  # ahead of the editable checkout; dependencies come from this environment
    where = subprocess.run(
        [sys.executable, "-c", "import captioner.paths as p; print(p.__file__); print(p.bundled_model_path())"],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
    )
    module, model = where.stdout.split()
    assert Path(module).is_relative_to(site) and Path(model).is_relative_to(site) and Path(model).is_file()
    r = subprocess.run(
        [sys.executable, "-m", "captioner", "caption", str(image), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=elsewhere,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    path, caption, *mark = r.stdout.strip().split("\t")
    assert path == str(image) and len(caption.split()) >= 3
    assert mark == [] or mark[0].startswith("(low confidence: ") and mark[1].startswith("tags: ")
    # the data files ride along: the ImageNet word table (used above) and the server's page
    for part in ("resources/imagenet_words.json", "serve/static/index.html", "serve/static/app.js"):
        assert (site / "captioner" / part).is_file(), part


def test_the_test_extra_lists_every_third_party_module_the_tests_import():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(d) for d in meta["dependencies"] + meta["optional-dependencies"]["test"]}
    dist = {"PIL": "pillow", "skimage": "scikit-image"}  # import name -> distribution name
    imported = set()
    for path in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                else []
            )
            imported |= {n.split(".")[0] for n in names}
    third_party = {dist.get(m, m) for m in imported - set(sys.stdlib_module_names) - {"captioner", "tests"}}
    assert third_party <= declared, sorted(third_party - declared)
    assert "hypothesis" in third_party  # the check sees what it should


def _name(requirement: str) -> str:
    return requirement.split(";")[0].split("[")[0].split("=")[0].split("<")[0].split(">")[0].strip().lower()
