"""`lossd bench --quick` runs end to end (a benchmark, not a timed test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_bench_prints_a_table_and_writes_json_and_a_plot(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lossd.cli",
            "bench",
            "--quick",
            "--repeats",
            "1",
            "--out",
            str(tmp_path),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "[1/" in done.stderr  # progress
    header = done.stdout.splitlines()[0]
    assert all(word in header for word in ("local ms", "unary ms", "stream ms", "shm ms"))
    report = json.loads((tmp_path / "bench.json").read_text())
    assert len(report["rows"]) >= 5
    assert all(set(row["remote_ms"]) == {"unary", "stream", "shm"} for row in report["rows"])
    assert report["throughput"]["4 clients steps/s"] > 0
    assert set(report["wire_precision"][report["rows"][0]["case"]]) == {
        "float32",
        "float16",
        "bfloat16",
    }
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
