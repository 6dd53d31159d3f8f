"""Peak resident memory of ``calcjax.score`` on one long chest scan (one JSON line per figure).

  python bench/memory.py [--slices 300] [--size 512]

A chest phantom (``data_prep.phantom``, ``--size`` x ``--size``) stretched along z to ``--slices`` slices
(nearest slice, the increment shrunk to keep the same length), written as NIfTI, then scored by
``python -m calcjax.score --nifti`` in a child process whose own peak RSS (``os.wait4``) is read; the
baseline is the same scan at its native slice count in the same command:

  {"bench": "memory", "scan": "512x512x300", "peak_rss_mib": ..., "baseline_scan": "512x512x61",
   "baseline_peak_rss_mib": ..., "ratio": ...}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def peak_rss_mib(cmd: list[str]) -> float:
    """Peak resident memory (MiB) of one child process, from its own rusage (``os.wait4``); RuntimeError
    with the end of its stderr when it fails. Its stderr goes to a file, never a pipe: a child that fills
    an unread pipe would block and never be waited for."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise RuntimeError(err.read().decode(errors="replace")[-2000:])
    return usage.ru_maxrss / 1024  # Linux: KiB


def write_chest(folder: str, size: int, slices: int | None) -> str:
    """A chest phantom as NIfTI in ``folder`` (stretched to ``slices`` when given); its shape as text."""
    import dataclasses

    from calcjax.io.nifti import write_ct_nifti
    from data_prep.phantom.generator import generate_scan

    scan = generate_scan(4, 1, "chest", size=size, target_category=3)
    hu, grid = scan.hu, scan.grid
    if slices:
        pick = np.minimum((np.arange(slices) * hu.shape[0]) // slices, hu.shape[0] - 1)
        dz = grid.spacing[0] * hu.shape[0] / slices
        hu = hu[pick]
        grid = dataclasses.replace(grid, shape=hu.shape, spacing=(dz, *grid.spacing[1:]))
    os.makedirs(folder, exist_ok=True)
    write_ct_nifti(os.path.join(folder, "chest.nii.gz"), hu, grid)
    return "x".join(str(n) for n in (hu.shape[1], hu.shape[2], hu.shape[0]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--size", type=int, default=512)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="calcjax-memory-bench-") as tmp:
        peaks = {}
        for name, slices in (("baseline", None), ("long", args.slices)):
            shape = write_chest(os.path.join(tmp, name), args.size, slices)
            cmd = [sys.executable, "-m", "calcjax.score", f"--nifti={os.path.join(tmp, name)}",
                   f"--out={os.path.join(tmp, name + '-out')}", "--num_bootstrap=0"]  # fmt: skip
            peaks[name] = (shape, peak_rss_mib(cmd))
    (base_shape, base), (shape, peak) = peaks["baseline"], peaks["long"]
    row = {"bench": "memory", "scan": shape, "peak_rss_mib": round(peak, 1), "baseline_scan": base_shape,
           "baseline_peak_rss_mib": round(base, 1), "ratio": round(peak / base, 3)}  # fmt: skip
    print(json.dumps(row))


if __name__ == "__main__":
    main()
