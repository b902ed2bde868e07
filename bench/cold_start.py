"""Cold start: seconds from `sidecar run` to a 200 from /_ready (store up, providers discovered).

Usage: .venv/bin/python bench/cold_start.py [--config sidecar.yaml] [--runs 5]
The default config uses the built-in test provider, which the sidecar discovers from itself.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def once(config: Path, admin: str) -> float:
    started = time.monotonic()
    proc = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "sidecar", "run", "--config", str(config)],
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
    )
    try:
        while time.monotonic() - started < 10:
            try:
                with urllib.request.urlopen(f"http://{admin}/_ready", timeout=0.5) as answer:
                    if answer.status == 200:
                        return time.monotonic() - started
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.01)
        raise SystemExit("not ready within 10 s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, default=ROOT / "sidecar.yaml")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    admin = yaml.safe_load(args.config.read_text()).get("admin_interface", "127.0.0.1:4985")
    times = [once(args.config, admin) for _ in range(args.runs)]
    print(
        f"ready after: median {statistics.median(times):.3f} s, max {max(times):.3f} s "
        f"over {len(times)} runs"
    )


if __name__ == "__main__":
    main()
