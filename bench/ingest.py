"""Ingest speed: shard-build throughput for 1 and 2 workers, and read_series against the pydicom floor.

  python bench/ingest.py [--scans 6] [--size 512]

Writes ``--scans`` cardiac phantom scans (512x512, ~45 slices) to a temporary folder, then prints one JSON
line per figure:
- ``build_scans_per_minute`` with ``--workers`` 1 and 2 (``python -m data_prep.build`` in-process API,
  a fresh output each time, one shard per scan so the workers share the work; whole pipeline: discovery,
  reading, labels, encoding, zstd ArrayRecord);
- ``read_series_vs_floor``: median seconds of ``calcjax.io.dicom.read_series`` per scan and of a bare
  ``pydicom.dcmread(f).pixel_array`` over the same files (the floor), and floor / ours (1.0 = no overhead;
  the aim is >= 0.7).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import tempfile
import time

import pydicom

from calcjax.io import dicom
from data_prep import builder
from data_prep.phantom.generator import generate_scan, write_scan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=6)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "in")
        for i in range(args.scans):
            write_scan(generate_scan(3, i, "cardiac", size=args.size), src, seed=3, index=i)
        folders = sorted(glob.glob(os.path.join(src, "*", "dicom")))
        for workers in (1, 2):
            out = os.path.join(tmp, f"out{workers}")
            t0 = time.perf_counter()
            m = builder.build(
                builder.BuildOptions(
                    src,
                    out,
                    split="train=1",
                    workers=workers,
                    salt="bench-ingest-salt",
                    records_per_shard=48,
                    progress=False,
                )
            )
            dt = time.perf_counter() - t0
            print(
                json.dumps(
                    {
                        "bench": "ingest",
                        "figure": "build_scans_per_minute",
                        "workers": workers,
                        "scans": m["num_scans"],
                        "slices": m["num_records"],
                        "seconds": round(dt, 2),
                        "value": round(60 * m["num_scans"] / dt, 1),
                    }
                )
            )
        ours, floor = [], []
        for folder in folders:
            files = sorted(glob.glob(os.path.join(folder, "*.dcm")))
            for _ in range(2):  # second pass: warm file cache for both
                t0 = time.perf_counter()
                [pydicom.dcmread(f).pixel_array for f in files]
                t1 = time.perf_counter()
                dicom.read_series(files)
                t2 = time.perf_counter()
            floor.append(t1 - t0)
            ours.append(t2 - t1)
        f, o = statistics.median(floor), statistics.median(ours)
        print(
            json.dumps(
                {
                    "bench": "ingest",
                    "figure": "read_series_vs_floor",
                    "seconds_read_series": round(o, 4),
                    "seconds_pydicom_floor": round(f, 4),
                    "value": round(f / o, 3),
                }
            )
        )


if __name__ == "__main__":
    main()
