"""Write a Lightning-style ``metrics.csv`` from a run's TensorBoard event files (needs the ``tensorboard`` package).

Where tensorboard is installed, Lightning's default logger used to be TensorBoard (``lesion-kd fit`` now
makes it CSV everywhere), so a cell trained there before that came back with event files and no
``metrics.csv``: the report's training curves read ``metrics.csv``. This rewrites every scalar, one row per
(epoch, step) as ``CSVLogger`` does:

    PYTHONPATH=/tmp/tb python benchmarks/events_to_metrics_csv.py RUN_VERSION_DIR OUT_CSV
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path


def main() -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="the lightning_logs/version_N folder holding events.out.tfevents.*")
    ap.add_argument("out", type=Path, help="the metrics.csv to write")
    args = ap.parse_args()
    files = sorted(args.run_dir.glob("events.out.tfevents.*"))
    if not files:
        raise SystemExit(f"{args.run_dir}: no events.out.tfevents.* files")
    rows: dict[int, dict[str, float]] = {}
    for f in files:
        ea = EventAccumulator(str(f), size_guidance={"scalars": 0})
        ea.Reload()
        for tag in ea.Tags()["scalars"]:
            if tag == "hp_metric":
                continue
            for e in ea.Scalars(tag):
                rows.setdefault(e.step, {})[tag] = e.value
    keys = sorted({k for r in rows.values() for k in r} - {"epoch"})
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["epoch", "step", *keys])
        for step in sorted(rows):
            r = rows[step]
            epoch = int(r["epoch"]) if "epoch" in r else ""
            w.writerow([epoch, step, *(r.get(k, "") for k in keys)])
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {len(rows)} steps, {len(keys)} metrics from {len(files)} event files")


if __name__ == "__main__":
    main()
