#!/usr/bin/env python
"""Mutation testing of the modules where a silent bug costs users most (docs/testing.md).

    python scripts/mutate.py                 # every module in [tool.mutmut] only_mutate
    python scripts/mutate.py beam metrics    # some of them (names below)
    python scripts/mutate.py --report        # the last results, counted per module, no run

mutmut (pinned in requirements-dev.txt) copies the package to mutants/, plants one small change at a
time (a flipped comparison, an off-by-one, a dropped argument...) and runs the fast tests that cover
the changed function; a mutant the tests do not notice "survived". Survivors that change nothing a
user could observe are listed, with the reason, in scripts/mutants_equivalent.txt; every other
survivor is a missing test. The run is resumable: mutmut keeps each mutant's result in mutants/.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EQUIVALENT = REPO / "scripts" / "mutants_equivalent.txt"
MODULES = {  # short name: the mutant-name prefixes (dotted module path) it covers
    "beam": ["captioner.beam."],
    "metrics": ["captioner.metrics."],
    "checkpoint": ["captioner.checkpoint."],
    "run_folder": ["captioner.training.run_folder."],
    "cache": ["captioner.features.cache."],
    "serve": ["captioner.serve.app.", "captioner.serve.budget."],
    "guidance": ["captioner.guidance."],
    "ptb": ["captioner.ptb."],
}
MISSED = ("survived", "no tests")  # mutants no test noticed (no tests: no fast test runs the function)
STATUSES = ("killed", "survived", "no tests", "timeout", "suspicious", "segfault", "skipped", "not checked")


def module_of(mutant: str) -> str | None:
    for name, prefixes in MODULES.items():
        if any(mutant.startswith(p) for p in prefixes):
            return name
    return None


def read_equivalent(path: Path = EQUIVALENT) -> dict[str, str]:
    """`mutant-name  # reason` lines; a name without a reason is refused (the reason is the point)."""
    out: dict[str, str] = {}
    if not path.is_file():
        return out
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, reason = line.partition("#")
        if not sep or not reason.strip():
            raise SystemExit(f"{path}:{n}: an equivalent mutant needs a reason after '#'")
        out[name.strip()] = reason.strip()
    return out


def parse_results(text: str) -> dict[str, str]:
    """`mutmut results --all true` lines ("    name: status") as {name: status}."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"\s*(\S+): (.+)$", line)
        if m and m.group(2).strip() in STATUSES:
            out[m.group(1)] = m.group(2).strip()
    return out


def tally(results: dict[str, str], equivalent: dict[str, str]) -> dict[str, dict[str, int]]:
    """Per module: each status's count; the missed ones split into equivalent (listed) and not ("missed")."""
    per: dict[str, Counter] = {name: Counter() for name in MODULES}
    for mutant, status in results.items():
        module = module_of(mutant)
        if module is None:
            continue
        per[module]["mutants"] += 1
        per[module][status] += 1
        if status in MISSED:
            per[module]["equivalent" if mutant in equivalent else "missed"] += 1
    return {m: dict(c) for m, c in per.items() if c}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="*", metavar="MODULE", help="any of: " + ", ".join(MODULES) + " (default: all)")
    ap.add_argument("--max-children", type=int, default=2, help="mutants tested at once (default 2)")
    ap.add_argument("--report", action="store_true", help="count the last results only")
    ap.add_argument("--json", action="store_true", help="the counts as JSON")
    args = ap.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        ap.error(f"unknown module {unknown[0]!r}: choose from {', '.join(MODULES)}")
    modules = args.modules or list(MODULES)
    if not args.report:
        globs = [f"{p}*" for m in modules for p in MODULES[m]]
        cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children), *globs]
        if subprocess.run(cmd, cwd=REPO).returncode not in (0, 1):  # 1: some survived
            return 2
    text = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=REPO, capture_output=True, text=True
    ).stdout
    equivalent = read_equivalent()
    results = parse_results(text)
    counts = {m: c for m, c in tally(results, equivalent).items() if m in modules}
    stale = sorted(n for n in equivalent if n not in results)
    unchecked = sum(c.get("not checked", 0) for c in counts.values())
    if args.json:
        print(json.dumps({"modules": counts, "stale_equivalent": stale}, indent=1))
    else:
        for m, c in counts.items():
            bad = c.get("missed", 0)
            share = bad / c["mutants"] if c.get("mutants") else 0.0
            rest = ", ".join(f"{k} {c[k]}" for k in STATUSES if c.get(k) and k != "killed")
            print(
                f"{m:11s} {c['mutants']:5d} mutants: killed {c.get('killed', 0)}; {rest}; "
                f"equivalent {c.get('equivalent', 0)}; missed (not equivalent) {bad} = {share:.1%}"
            )
        for n in stale:
            print(f"note: {n} is listed as equivalent but mutmut has no such mutant (the code changed?)")
        survivors = [n for n, s in results.items() if s in MISSED and n not in equivalent and module_of(n) in modules]
        if survivors:
            print("missed, not listed as equivalent (see `python -m mutmut show NAME`):")
            print("\n".join(f"  {n}" for n in sorted(survivors)))
    if unchecked and not args.report:  # mutmut exits 0 even when its first test run failed
        print(f"error: {unchecked} mutants not checked: the run failed or stopped (see mutmut's output above)")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
