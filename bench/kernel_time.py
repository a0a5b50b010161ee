"""Where a parallel cross-validation's CPU time goes: user, system, page faults, wall.

Runs the same ``train.py`` cross-validation twice, each in a throw-away project root: once
with glibc's malloc defaults (``SER_PIPELINE_MALLOC=system``) and once with the project's
(``ser_pipeline.allocator``: freed memory kept for the next batch). The child processes'
resource usage (``getrusage(RUSAGE_CHILDREN)``: the command, its fold workers) is the
measure; both runs must give the same fold metrics, since only memory reuse differs.
Default: the synthetic corpus, 4 speaker folds, 2 worker processes (issue 15 item 5)::

    python bench/kernel_time.py
    python bench/kernel_time.py -- data=emodb data.split=ltso   # any train.py overrides
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/kernel_time.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, command_line, format_table, machine_info, started_at, write_result

DEFAULT_OVERRIDES = ["data.fold=all", "data.split=group_kfold", "data.n_folds=4",
                     "cv.workers=2", "trainer.enable_progress_bar=false", "data.progress=false"]
#: the console's fold table: "   0  spk03,spk07   0.7083  0.7083  0.6885  0.8542"
FOLD_LINE = re.compile(r"^\s*\d+\s+\S+\s+(\d\.\d{4})\s+(\d\.\d{4})\s+(\d\.\d{4})\s+(\d\.\d{4})$")
SETTINGS = {"glibc defaults": {"SER_PIPELINE_MALLOC": "system"}, "ser_pipeline": {}}


def measure(overrides: list[str], extra_env: dict[str, str]) -> dict[str, Any]:
    """One cross-validation in a fresh root: its children's CPU times, faults, wall, folds."""
    with tempfile.TemporaryDirectory(prefix="kernel_time_") as root:
        env = {k: v for k, v in os.environ.items()
               if k not in ("MLFLOW_TRACKING_URI", "SER_PIPELINE_MALLOC")}
        env.update(SER_PIPELINE_ROOT=root, PYTHONUNBUFFERED="1", **extra_env)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(REPO / "train.py"), *overrides], cwd=root,
                              env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"train.py failed:\n{done.stderr[-3000:]}")
    folds = [[float(x) for x in m.groups()] for line in done.stdout.splitlines()
             if (m := FOLD_LINE.match(line))]
    return {"user_s": after.ru_utime - before.ru_utime,
            "system_s": after.ru_stime - before.ru_stime,
            "minor_faults": after.ru_minflt - before.ru_minflt,
            "peak_rss_mb": after.ru_maxrss / 1024,  # the largest child's
            "wall_s": wall, "folds": folds}


#: the columns of :func:`cells` (the README table adds its own after them)
HEADERS = ["malloc", "user s", "system s", "kernel share", "minor faults", "wall s",
           "peak RSS MiB"]


def cells(label: str, row: dict[str, Any]) -> list[str]:
    """One measured setting as table cells (this script's table and the README's)."""
    return [label, f"{row['user_s']:.1f}", f"{row['system_s']:.1f}",
            f"{100 * row['system_s'] / (row['user_s'] + row['system_s']):.0f} %",
            f"{row['minor_faults'] / 1e6:.2f} M", f"{row['wall_s']:.0f}",
            f"{row['peak_rss_mb']:.0f}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="kernel-time-synthetic-cv",
                        help="result file name (bench/results/<name>.json)")
    parser.add_argument("overrides", nargs="*", help="train.py overrides after --")
    args = parser.parse_args(argv)
    overrides = [*DEFAULT_OVERRIDES, *args.overrides]
    machine = machine_info()
    rows = {label: measure(overrides, env) for label, env in SETTINGS.items()}
    same = rows["glibc defaults"]["folds"] == rows["ser_pipeline"]["folds"]
    print(format_table(HEADERS, [cells(label, r) for label, r in rows.items()]))
    print(f"fold metrics identical: {same}")
    write_result({"benchmark": "kernel_time", "command": command_line("bench/kernel_time.py",
                                                                      sys.argv[1:]),
                  "train_overrides": overrides, "started_at": started_at(),
                  "machine": machine, "load_average_after": list(os.getloadavg()),
                  "rows": rows, "identical_fold_metrics": same}, args.name)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
