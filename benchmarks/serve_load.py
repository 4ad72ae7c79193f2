"""Throughput and latency of `captioner serve` under load, side by side in one run: a real server
(a `captioner serve` process on a free loopback port), the same single-photo requests sent one at
a time, then by 16 concurrent clients.

    python benchmarks/serve_load.py [--requests 96] [--clients 16] [--model CKPT] [--json OUT]

Prints images/s and p50/p95 latency for both, their ratio, and the server's resident memory.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "assets" / "examples"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body_for(path: Path) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    head = f'--{b}\r\nContent-Disposition: form-data; name="files"; filename="{path.name}"\r\n\r\n'.encode()
    return head + path.read_bytes() + f"\r\n--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"


def post(port: int, body: bytes, ctype: str) -> float:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("POST", "/api/caption", body=body, headers={"Content-Type": ctype})
    r = conn.getresponse()
    r.read()
    conn.close()
    if r.status != 200:
        raise RuntimeError(f"server answered {r.status}")
    return time.perf_counter() - t0


def run(port: int, bodies: list, clients: int) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(lambda b: post(port, *b), bodies))
    return time.perf_counter() - t0, latencies


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--model", help="checkpoint (default: the bundled model)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the numbers here too")
    a = p.parse_args()
    port = free_port()
    cmd = [sys.executable, "-m", "captioner", "serve", "--port", str(port), "--device", "cpu"]
    cmd += ["--model", a.model] if a.model else []
    server = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    sys.exit("the server did not start")
                time.sleep(0.2)
        photos = [f for f in sorted(EXAMPLES.iterdir()) if f.suffix in (".jpg", ".png")]
        bodies = [body_for(photos[i % len(photos)]) for i in range(a.requests)]
        run(port, bodies[:8], 4)  # warm up
        serial_s, serial = run(port, bodies, 1)
        conc_s, conc = run(port, bodies, a.clients)
        rss = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)

    def q(xs: list[float], f: float) -> float:
        return statistics.quantiles(xs, n=100)[int(f * 100) - 1] * 1000

    print(f"{a.requests} single-photo requests, {os.cpu_count()} CPU cores, server RSS {rss:.0f} MB")
    print("| clients | images/s | p50 latency (ms) | p95 latency (ms) |\n|---|---|---|---|")
    print(f"| 1 (one at a time) | {a.requests / serial_s:.1f} | {q(serial, 0.5):.0f} | {q(serial, 0.95):.0f} |")
    print(f"| {a.clients} concurrent | {a.requests / conc_s:.1f} | {q(conc, 0.5):.0f} | {q(conc, 0.95):.0f} |")
    print(f"throughput ratio (concurrent / one at a time): {serial_s / conc_s:.2f}x")
    if a.json:
        runs = {"1": (serial_s, serial), str(a.clients): (conc_s, conc)}
        out = {
            "requests": a.requests,
            "clients": a.clients,
            "server_rss_mb": rss,
            "runs": {
                k: {
                    "wall_s": s,
                    "latencies_s": lat,
                    "images_per_s": a.requests / s,
                    "p50_ms": q(lat, 0.5),
                    "p95_ms": q(lat, 0.95),
                }
                for k, (s, lat) in runs.items()
            },
            "throughput_ratio": serial_s / conc_s,
        }
        a.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
