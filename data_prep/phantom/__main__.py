r"""Writes realistic phantom chest / cardiac CT scans with exact calcium ground truth.

  python -m data_prep.phantom --out DIR --scans N --protocol chest|cardiac|mixed --seed S [--size 512] \
      [--workers W] [--preview DIR/preview.png] [--overwrite] [--phantom_version 1|2|3|4] \
      [--groove_fat_mm LOW,HIGH] [--gated_caudal_mm LOW,HIGH] [--plaque_peak_max_hu HU] \
      [--bulky_plaque_probability P]

Each scan becomes ``DIR/<scan>/`` with ``dicom/IM-0001-NNNN.dcm`` (one CT file per slice),
``label.nii.gz``, ``calcium.xml`` (COCA-style plist) and ``truth.json``. A scan folder appears whole or not
at all (written under a temporary name, then renamed); finished scans are kept on a rerun unless
``--overwrite``. ``mixed`` alternates cardiac (even indices) and chest (odd); scan ``i`` aims at risk
category ``i % 5``, so any 10 consecutive scans cover both protocols and all five categories.
"""

from __future__ import annotations

import concurrent.futures
import os

from absl import flags, logging
from tqdm import tqdm

from calcjax.core import cli
from data_prep.phantom.generator import check_options, generate_scan, protocol_of, scan_name, write_scan

_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_SCANS = flags.DEFINE_integer("scans", 10, "Number of scans.", lower_bound=1)
_PROTOCOL = flags.DEFINE_enum("protocol", "mixed", ["chest", "cardiac", "mixed"], "Acquisition protocol.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed; the same seed gives byte-identical pixel data.", lower_bound=0)
_SIZE = flags.DEFINE_integer("size", 512, "Matrix size (rows = columns); pixel = FOV / size.", lower_bound=32)
_WORKERS = flags.DEFINE_integer("workers", 1, "Processes generating scans in parallel.", lower_bound=1)
_PREVIEW = flags.DEFINE_string("preview", None, "Write a PNG of a few slices of the first scans here.")
_PREVIEW_SCANS = flags.DEFINE_list("preview_scans", ["0", "1"], "Indices of the scans the preview shows.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Regenerate scans whose folder already exists.")
_VERSION = flags.DEFINE_enum(
    "phantom_version",
    "1",
    ["1", "2", "3", "4"],
    "Generator version (data_prep.phantom.generator: what v2, v3 and v4 change).",
)


_GROOVE = flags.DEFINE_list(
    "groove_fat_mm",
    None,
    "LOW,HIGH mm: the coronary fat sleeve drawn uniformly per scan instead of the version's range "
    "(versions 3 and 4; anatomy_v3.GROOVE_FAT_MM).",
)


_CAUDAL = flags.DEFINE_list(
    "gated_caudal_mm",
    None,
    "LOW,HIGH mm: extra coverage below each cardiac scan, drawn uniformly per scan (upper abdomen; "
    "data_prep.phantom.generator).",
)


_PLAQUE_MAX = flags.DEFINE_float(
    "plaque_peak_max_hu",
    None,
    "HU: the top Agatston weight band's upper edge for coronary plaques instead of 900 (real dense "
    "plaques peak higher; data_prep.phantom.generator).",
)


_BULKY = flags.DEFINE_float(
    "bulky_plaque_probability",
    None,
    "Probability that a scan with calcium also gets one bulky plaque, a dense calcification wider than "
    "its vessel (calcium.bulky_plaque; real dense plaques bloom into masses of several mm).",
)


def _mm_range(values: list[str] | None) -> tuple[float, ...] | None:
    """A LOW,HIGH list flag as floats (None when not given; check_options checks the range)."""
    return tuple(float(v) for v in values) if values else None


def _one(args):
    """Generates and writes one scan; returns (index, summary, scan kept for the preview or None)."""
    out, seed, index, protocol, size, keep, overwrite, version, groove, caudal, plaque_max, bulky = args
    folder = os.path.join(out, scan_name(seed, index, protocol))
    if not overwrite and not keep and os.path.exists(os.path.join(folder, "truth.json")):
        return index, None, None
    scan = generate_scan(
        seed,
        index,
        protocol,
        size=size,
        version=version,
        groove_fat_mm=groove,
        gated_caudal_mm=caudal,
        plaque_peak_max_hu=plaque_max,
        bulky_plaque_probability=bulky,
    )
    write_scan(scan, out, seed=seed, index=index)
    ref = scan.truth["reference"]
    summary = (scan.name, protocol, scan.hu.shape[0], ref["agatston"], ref["risk_category_name"])
    return index, summary, scan if keep else None


def main(argv):
    del argv
    options = (
        int(_VERSION.value),
        _mm_range(_GROOVE.value),
        _mm_range(_CAUDAL.value),
        _PLAQUE_MAX.value,
        _BULKY.value,
    )
    cli.run_or_exit("data_prep.phantom", lambda: check_options(*options), (ValueError,))
    out = _OUT.value
    os.makedirs(out, exist_ok=True)
    jobs = [
        (
            out,
            _SEED.value,
            i,
            protocol_of(i, _PROTOCOL.value),
            _SIZE.value,
            _PREVIEW.value is not None and str(i) in _PREVIEW_SCANS.value,
            _OVERWRITE.value,
            *options,
        )
        for i in range(_SCANS.value)
    ]
    kept, rows, skipped = {}, [], 0
    with tqdm(total=len(jobs), desc="phantom scans", unit="scan") as bar:
        if _WORKERS.value == 1:
            results = map(_one, jobs)
        else:
            pool = concurrent.futures.ProcessPoolExecutor(_WORKERS.value)
            results = pool.map(_one, jobs)
        for index, summary, scan in results:
            if summary is None:
                skipped += 1
            else:
                rows.append(summary)
            if scan is not None:
                kept[index] = scan
            bar.update()
        if _WORKERS.value > 1:
            pool.shutdown()
    for name, protocol, nz, total, cat in sorted(rows):
        print(f"{name}: {protocol}, {nz} slices, Agatston {total:.1f}, category {cat}")
    if skipped:
        print(f"{skipped} scans already present, kept (use --overwrite to regenerate)")
    if _PREVIEW.value:
        from data_prep.phantom.preview import write_preview

        write_preview(_PREVIEW.value, [kept[i] for i in sorted(kept)])
        print(f"preview: {os.path.abspath(_PREVIEW.value)}")
    print(f"phantom scans in {os.path.abspath(out)}")
    logging.info("done")


def run() -> None:
    """The console command ``calcjax-phantom``."""
    cli.run_command("calcjax-phantom", "data_prep.phantom", __doc__, main)


if __name__ == "__main__":
    run()
