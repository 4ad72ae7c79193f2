"""How long `captioner --help` and `captioner caption --help` take to start, side by side with a
bare Python start and with importing torch (what every command paid before the CLI stopped
loading torch for help). Target: help in <= 0.5 s.

    python benchmarks/cli_startup.py [--repeats 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "captioner --help": [sys.executable, "-m", "captioner", "--help"],
    "captioner caption --help": [sys.executable, "-m", "captioner", "caption", "--help"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, metavar="OUT", help="write the numbers here too")
    a = ap.parse_args()
    best = dict.fromkeys(CASES, float("inf"))
    runs: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(a.repeats):  # interleaved, best of N: the machine's noise hits all alike
        for name, cmd in CASES.items():
            t = time.perf_counter()
            subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
            runs[name].append(time.perf_counter() - t)
            best[name] = min(best[name], runs[name][-1])
    base = best["captioner --help"]
    print(f"best of {a.repeats} starts each\n| command | seconds | x captioner --help |\n|---|---|---|")
    for name, t in best.items():
        print(f"| {name} | {t:.2f} | {t / base:.2f}x |")
    if a.json:
        out = {"repeats": a.repeats, "seconds": runs, "best_s": best, "x_help": {n: t / base for n, t in best.items()}}
        a.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
