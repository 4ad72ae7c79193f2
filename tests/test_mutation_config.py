"""The mutation-testing set-up stays coherent: what pyproject.toml mutates and runs exists, the
script's module names cover exactly those files, and its counting is right."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["mutmut"]


def _script():
    spec = importlib.util.spec_from_file_location("mutate", REPO / "scripts" / "mutate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mutated_files_and_their_tests_exist():
    assert all((REPO / p).is_file() for p in CONFIG["only_mutate"]), CONFIG["only_mutate"]
    assert all((REPO / p).is_file() for p in CONFIG["pytest_add_cli_args_test_selection"])


def test_script_modules_are_the_mutated_files():
    mutate = _script()
    dotted = {p.removesuffix(".py").replace("/", ".") + "." for p in CONFIG["only_mutate"]}
    assert {p for prefixes in mutate.MODULES.values() for p in prefixes} == dotted


def test_equivalent_list_gives_a_reason_for_each(tmp_path):
    mutate = _script()
    listed = mutate.read_equivalent()
    assert all(reason for reason in listed.values())
    assert all(mutate.module_of(name) for name in listed), "an equivalent mutant outside the mutated modules"
    bad = tmp_path / "eq.txt"
    bad.write_text("captioner.beam.x_topk__mutmut_1\n")
    with pytest.raises(SystemExit, match="reason"):
        mutate.read_equivalent(bad)


def test_counts_per_module():
    mutate = _script()
    text = "\n".join(
        [
            "    captioner.beam.x_topk__mutmut_1: killed",
            "    captioner.beam.x_topk__mutmut_2: survived",
            "    captioner.beam.x_topk__mutmut_3: survived",
            "    captioner.beam.x_topk__mutmut_4: no tests",
            "    captioner.serve.budget.x__trimmer__mutmut_1: timeout",
            "    captioner.models.x_f__mutmut_1: survived",  # not a mutated module: not counted
            "some other line",
        ]
    )
    results = mutate.parse_results(text)
    assert len(results) == 6
    counts = mutate.tally(results, {"captioner.beam.x_topk__mutmut_3": "same result"})
    assert counts == {
        "beam": {"mutants": 4, "killed": 1, "survived": 2, "no tests": 1, "equivalent": 1, "missed": 2},
        "serve": {"mutants": 1, "timeout": 1},
    }
