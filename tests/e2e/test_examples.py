"""The example trainer runs against a real server and its loss goes down."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_example_trains_and_the_loss_goes_down(target: str) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "train_simclr.py"),
            "--server",
            target,
            "--steps",
            "40",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    losses = [float(line.split()[-1]) for line in done.stdout.splitlines() if "loss" in line]
    assert len(losses) == 40
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < first - 0.1, (first, last)
