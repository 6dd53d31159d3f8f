"""Seconds to generate and write one 512x512 phantom scan, per protocol (one JSON line each).

  python bench/phantom.py [--scans 3] [--size 512]

Each figure is the median over ``--scans`` scans of the time to generate the scan in memory and to write
its DICOM series, NIfTI label, COCA XML and truth.json; ``slices`` is the median slice count, and
``ratio_to_cardiac`` compares each protocol with the cardiac figure measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from data_prep.phantom.generator import generate_scan, write_scan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as out:
        for protocol in ("cardiac", "chest"):
            gen, total, slices = [], [], []
            for i in range(args.scans):
                t0 = time.perf_counter()
                scan = generate_scan(args.seed, i, protocol, size=args.size)
                t1 = time.perf_counter()
                write_scan(scan, out, seed=args.seed, index=i)
                t2 = time.perf_counter()
                gen.append(t1 - t0)
                total.append(t2 - t0)
                slices.append(scan.hu.shape[0])
            results[protocol] = (statistics.median(total), statistics.median(gen), statistics.median(slices))
    base = results["cardiac"][0]
    for protocol, (total, gen, slices) in results.items():
        print(
            json.dumps(
                {
                    "bench": "phantom_scan_seconds",
                    "protocol": protocol,
                    "size": args.size,
                    "scans": args.scans,
                    "slices": slices,
                    "seconds_per_scan": round(total, 3),
                    "seconds_generate": round(gen, 3),
                    "seconds_write": round(total - gen, 3),
                    "ratio_to_cardiac": round(total / base, 3),
                }
            )
        )


if __name__ == "__main__":
    main()
