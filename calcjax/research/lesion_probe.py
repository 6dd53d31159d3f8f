"""Lesion-insertion probe: does a model find a standard calcification placed where reference lesions are?

Why does a phantom-trained model miss real plaques? A miss has two possible causes: the real
lesion looks unlike a phantom lesion, or the real *surroundings* make the model say background. The probe
separates them. For every 3D reference lesion (6-connected voxels with label > 0) of a scan it

1. erases the lesion: its voxels, grown ``ERASE_GROW_PX`` pixels in-plane, take the median HU of a ring
   ``RING_PX`` pixels wide around them on the same slices (reference calcium left out of the ring);
2. paints one standard lesion at the lesion's centroid, on the centroid's slice: a Gaussian disc of
   in-plane SD ``sigma_mm`` blended to the peak, ``hu = hu * (1 - g) + peak_hu * g`` (``g`` = 1 at the
   centre);
3. predicts the scan and counts the disc *found* when a voxel of it (``g > FOUND_G``) with HU >= 130 is
   predicted calcium (any artery).

With ``surround_mm`` > 0 each peak is probed twice more with the background within ``surround_mm`` of
each centre (in-plane, on the centre's slice and the model's context slices) set, before painting, to
fat and to soft tissue (``SURROUND_HU``, with Gaussian noise of ``SURROUND_NOISE_SD_HU``): what the
disc sits in, apart from where it is. The shipped model finds a 2 mm SD, 900 HU disc at the 20 real
gated lesion places 6 times as they are, 20 ringed by 6 mm of fat and 0 ringed by soft tissue; at the 23
lesion places of 6 unseen v3 cardiac phantoms 23, 21 and 3 (docs/experiments/).

The same standard lesion at the same kind of place, scored in real scans and in phantoms: the gap between
the two found fractions is the model's context gap, the part that better lesions cannot close. ``peak_hu``
None scores the reference lesions as they are (found: any of its voxels predicted calcium), the baseline.

No heart region is applied (inserted lesions lie where reference calcium is, inside it by construction).
Output: one JSON line per peak with the counts over all probed scans, then one line per band of the
reference lesions' own peak HU (``PEAK_BANDS_HU``; lesions here: 6-connected voxels with label > 0 and HU
>= 130) with the baseline's lesions found and calcium voxels found in that band (is the brightest real
calcium, beyond the phantoms' plaques, what is missed?), then one line per ``grow_px`` with the baseline's
voxel and false-positive lesion counts after its predicted calcium, kept in the heart region as the scorer
keeps it, is grown that many pixels into the >= 130 HU voxels around it (``agatston.grow_to_threshold``):
does the model find a lesion's core and stop short of its footprint at 130 HU, where a reference lesion
is all of it? No scan id or header value.

    python -m calcjax.research.lesion_probe --out probe_real.jsonl \
        --shards 'real_shards/gated-*/*.array_record'
    python -m calcjax.research.lesion_probe --protocol cardiac \
        --shards "PHANTOM_SHARDS/test-*.array_record" ...
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app, flags, logging
from scipy import ndimage

from calcjax.core import agatston, cli, metrics
from calcjax.core.hu import CT_MAX_HU, CT_MIN_HU
from calcjax.data import scan_sources
from calcjax.inference import postprocess
from calcjax.inference import predictor as inference
from calcjax.io import atomic
from calcjax.model import checkpoint
from calcjax.model import files as model_file

ERASE_GROW_PX = 2
RING_PX = 3
FOUND_G = 0.3
# Lower edges (HU) of the bands of a reference lesion's peak; the last is open above. A phantom cluster's
# first plaque peaks at most 900 HU before noise (data_prep.phantom.calcium.WEIGHT_BANDS_HU), the rest
# within 20% of it.
PEAK_BANDS_HU = (130.0, 300.0, 500.0, 800.0)
GROW_PX = (0, 2, 4, 8, 20)  # default --grow_px: in-plane pixels of growth into >= 130 HU voxels
SURROUND_HU = {"fat": -100.0, "soft tissue": 40.0}  # docs/background.md: fat -100, blood and myocardium +40
SURROUND_NOISE_SD_HU = 15.0


def erase_lesions(hu: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """float32 copy of ``hu`` ``(Z, H, W)`` with every reference lesion (``labels > 0``) replaced, slice
    by slice, by the median HU of the ring around it (module doc, step 1)."""
    out = hu.astype(np.float32)
    grow = np.ones((2 * ERASE_GROW_PX + 1,) * 2, bool)
    ring_el = np.ones((2 * RING_PX + 1,) * 2, bool)
    for z in np.flatnonzero((labels > 0).any(axis=(1, 2))):
        comps, n = ndimage.label(labels[z] > 0)
        for i in range(1, n + 1):
            core = ndimage.binary_dilation(comps == i, grow)
            ring = ndimage.binary_dilation(core, ring_el) & ~core & (labels[z] == 0)
            if ring.any():
                out[z][core] = np.median(hu[z][ring])
    return out


def disc_weight(shape_hw: tuple[int, int], centre_yx, sigma_mm: float, pixel_mm) -> np.ndarray:
    """Gaussian weight ``(H, W)`` in [0, 1], 1 at ``centre_yx`` (pixels), in-plane SD ``sigma_mm``;
    ``pixel_mm`` = (dy, dx) mm."""
    yy, xx = np.indices(shape_hw, dtype=np.float32)
    d2 = ((yy - centre_yx[0]) * pixel_mm[0]) ** 2 + ((xx - centre_yx[1]) * pixel_mm[1]) ** 2
    return np.exp(-d2 / (2.0 * sigma_mm**2)).astype(np.float32)


def insert_lesions(
    hu: np.ndarray,
    labels: np.ndarray,
    spacing,
    peak_hu: float,
    sigma_mm: float,
    surround: tuple[float, float, int] | None = None,
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """int16 HU with every reference lesion erased and a standard one painted at its centroid (module
    doc), and per lesion ``(slice, disc mask (H, W))`` where it is judged. ``surround`` ``(HU, radius mm,
    context slices)``: before painting, the background within that radius of each centre, on its slice
    and that many slices either side, reads that HU plus noise (SD ``SURROUND_NOISE_SD_HU``, seed 0)."""
    out = erase_lesions(hu, labels)
    discs = []
    rng = np.random.default_rng(0)
    for c in metrics.lesion_centres(labels):
        z = int(round(c[0]))
        g = disc_weight(hu.shape[1:], c[1:], sigma_mm, spacing[1:])
        if surround is not None:
            value, radius_mm, context = surround
            inside = g >= np.exp(-(radius_mm**2) / (2.0 * sigma_mm**2))  # the in-plane disc of radius_mm
            zs = slice(max(z - context, 0), z + context + 1)
            sub = out[zs]
            sub[:, inside] = value + rng.normal(0.0, SURROUND_NOISE_SD_HU, (sub.shape[0], int(inside.sum())))
        out[z] = out[z] * (1.0 - g) + np.float32(peak_hu) * g
        discs.append((z, g > FOUND_G))
    return np.clip(np.round(out), CT_MIN_HU, CT_MAX_HU).astype(np.int16), discs


def found_by_peak(pred: np.ndarray, hu: np.ndarray, labels: np.ndarray) -> dict[float, np.ndarray]:
    """``{band lower edge: [lesions, lesions found, calcium voxels, calcium voxels found]}`` (int64) of the
    reference calcium of one scan (``labels > 0`` and HU >= 130, 6-connected 3D lesions), by the band
    (``PEAK_BANDS_HU``) of each lesion's peak HU; ``pred``: bool ``(Z, H, W)`` predicted calcium."""
    out = {lo: np.zeros(4, np.int64) for lo in PEAK_BANDS_HU}
    comps, n = ndimage.label((labels > 0) & agatston.candidate_mask(hu))
    if n == 0:
        return out
    ids = np.arange(1, n + 1)
    peak = ndimage.maximum(hu, comps, ids)
    voxels = np.bincount(comps.ravel(), minlength=n + 1)[1:]
    found = np.bincount(comps[pred].ravel(), minlength=n + 1)[1:]
    band = np.searchsorted(PEAK_BANDS_HU, peak, side="right") - 1
    for b, lo in enumerate(PEAK_BANDS_HU):
        m = band == b
        out[lo] += [m.sum(), (found[m] > 0).sum(), voxels[m].sum(), found[m].sum()]
    return out


def grown_counts(pred: np.ndarray, hu: np.ndarray, labels: np.ndarray, grow_px) -> dict[int, np.ndarray]:
    """``{steps: [voxel TP, FP, FN, false-positive lesions]}`` (int64) of predicted labels ``pred``
    ``(Z, H, W)`` grown ``steps`` in-plane pixels into the >= 130 HU voxels around them
    (``agatston.grow_to_threshold``; 0: as predicted, on the >= 130 HU voxels) against the reference
    calcium (``labels > 0`` and >= 130 HU), with :mod:`calcjax.core.metrics`' voxel and 3D lesion rules."""
    ref = (labels > 0) & agatston.candidate_mask(hu)
    counts, grown, done = {}, pred, 0
    for steps in sorted(set(grow_px)):  # each growth goes on from the last: k steps then m = k + m steps
        grown = agatston.grow_to_threshold(grown, hu, steps - done)
        done = steps
        tp, fp, fn = metrics.voxel_counts(grown > 0, ref)
        fp_lesions = metrics.lesion_counts(grown > 0, ref)["fp_lesions"]
        counts[steps] = np.array([tp, fp, fn, fp_lesions], np.int64)
    return {steps: counts[steps] for steps in grow_px}


def probe_scan(
    predictor: inference.Predictor,
    loaded: scan_sources.LoadedScan,
    peaks,
    sigma_mm: float,
    by_peak: dict[float, np.ndarray] | None = None,
    by_grow: dict[int, np.ndarray] | None = None,
    surround_mm: float = 0.0,
) -> dict:
    """``{peak: (found, lesions)}`` of one labelled scan; key None = its reference lesions as they are;
    with ``surround_mm`` > 0 also ``{(peak, name): ...}`` per ``SURROUND_HU`` name (module doc).
    ``by_peak`` (a :func:`found_by_peak` dict) gets this scan's baseline counts added; ``by_grow``
    (``{steps: zeros(4)}``) its :func:`grown_counts` of the baseline kept in the heart region."""
    spacing = loaded.grid.spacing
    labels_pred = predictor.predict(loaded.hu, spacing)
    pred = labels_pred > 0
    as_is = metrics.lesion_counts(pred, loaded.labels > 0)
    if by_peak is not None:
        for lo, counts in found_by_peak(pred, loaded.hu, loaded.labels).items():
            by_peak[lo] += counts
    if by_grow is not None:
        post = postprocess.PostProcess(use_heart_region=True)
        in_region, _ = postprocess.restrict_and_complete(
            labels_pred, loaded.hu, spacing, post, agatston.CALCIUM_THRESHOLD_HU
        )
        for steps, counts in grown_counts(in_region, loaded.hu, loaded.labels, tuple(by_grow)).items():
            by_grow[steps] += counts
    out = {None: (as_is["detected_lesions"], as_is["ref_lesions"])}
    context = (predictor.in_channels - 1) // 2  # the slices either side the model reads
    for peak in peaks:
        for name in (None, *(SURROUND_HU if surround_mm > 0 else ())):
            surround = None if name is None else (SURROUND_HU[name], surround_mm, context)
            hu, discs = insert_lesions(loaded.hu, loaded.labels, spacing, peak, sigma_mm, surround)
            pred = (predictor.predict(hu, spacing) > 0) & agatston.candidate_mask(hu)
            out[peak if name is None else (peak, name)] = (
                sum(bool(pred[z][m].any()) for z, m in discs),
                len(discs),
            )
    return out


def probe(
    shards: str,
    *,
    checkpoint_path: str | None,
    peaks=(200.0, 350.0, 600.0),
    sigma_mm: float = 1.0,
    protocol: str | None = None,
    max_scans: int = 0,
    grow_px=GROW_PX,
    surround_mm: float = 0.0,
    progress=True,
) -> list[dict]:
    """The probe over the labelled scans of ``shards`` (a glob; ``protocol`` keeps one protocol;
    ``max_scans`` > 0 stops after that many probed scans): one dict per peak (None first) with
    ``found``, ``lesions``, ``fraction``, ``scans``, then one per band of the reference lesions' peak
    (``reference_peak_hu`` [low, high or None]) with ``lesions``, ``found``, ``calcium_voxels``,
    ``found_voxels``, ``voxel_recall``, ``scans``, then one per ``grow_px`` (``grow_px``, ``voxel_tp``,
    ``voxel_fp``, ``voxel_fn``, ``voxel_f1``, ``precision``, ``recall``, ``fp_lesions_per_scan``, ``scans``;
    :func:`grown_counts`, in the heart region). With ``surround_mm`` > 0 each peak's line is followed by
    one per ``SURROUND_HU`` name, with ``surround`` and ``surround_mm`` added."""
    predictor = inference.Predictor.from_checkpoint(checkpoint_path)
    scans, _ = scan_sources.shard_scans(shards, context=(predictor.in_channels - 1) // 2)
    names = tuple(SURROUND_HU) if surround_mm > 0 else ()
    keys = [None]  # the reference lesions as they are, then each peak followed by its surrounds
    for p in peaks:
        keys += [p, *((p, n) for n in names)]
    totals = {k: [0, 0] for k in keys}
    by_peak = {lo: np.zeros(4, np.int64) for lo in PEAK_BANDS_HU}
    by_grow = {int(k): np.zeros(4, np.int64) for k in grow_px}
    probed = 0
    for scan in scans:
        loaded = scan.load()
        if loaded.labels is None or not (loaded.labels > 0).any():
            continue
        if protocol and loaded.meta.get("protocol") != protocol:
            continue
        for p, (k, n) in probe_scan(
            predictor, loaded, peaks, sigma_mm, by_peak, by_grow, surround_mm
        ).items():
            totals[p][0] += k
            totals[p][1] += n
        probed += 1
        if progress:
            logging.info("probed %d scans", probed)
        if max_scans and probed >= max_scans:
            break
    lines = [_insertion_line(p, k, n, sigma_mm, surround_mm, probed) for p, (k, n) in totals.items()]
    bounds = (*PEAK_BANDS_HU[1:], None)
    lines += [_band_line(lo, hi, c, probed) for (lo, c), hi in zip(by_peak.items(), bounds, strict=True)]
    return lines + [_grow_line(k, c, probed) for k, c in by_grow.items()]


def _insertion_line(p, k: int, n: int, sigma_mm: float, surround_mm: float, probed: int) -> dict:
    """Standard lesions found / inserted at peak ``p`` (None: the reference lesions; ``(peak, name)``: in a
    surround)."""
    return {
        "peak_hu": p[0] if isinstance(p, tuple) else p,
        "sigma_mm": sigma_mm if p is not None else None,
        **({"surround": p[1], "surround_mm": surround_mm} if isinstance(p, tuple) else {}),
        "found": k,
        "lesions": n,
        "fraction": round(k / n, 4) if n else None,
        "scans": probed,
    }


def _band_line(lo: float, hi: float | None, c: np.ndarray, probed: int) -> dict:
    """The reference lesions whose peak lies in [lo, hi): lesions, found, their voxels and those found."""
    return {
        "reference_peak_hu": [lo, hi],
        "lesions": int(c[0]),
        "found": int(c[1]),
        "calcium_voxels": int(c[2]),
        "found_voxels": int(c[3]),
        "voxel_recall": round(int(c[3]) / int(c[2]), 4) if c[2] else None,
        "scans": probed,
    }


def _grow_line(k: int, c: np.ndarray, probed: int) -> dict:
    """Voxel figures of the baseline grown ``k`` pixels into the >= 130 HU voxels around it."""
    tp, fp, fn, fp_lesions = (int(x) for x in c)
    return {
        "grow_px": k,
        "voxel_tp": tp,
        "voxel_fp": fp,
        "voxel_fn": fn,
        "voxel_f1": round(float(metrics.f1_from_counts(tp, fp, fn)), 4),
        "precision": round(tp / (tp + fp), 4) if tp + fp else None,
        "recall": round(tp / (tp + fn), 4) if tp + fn else None,
        "fp_lesions_per_scan": round(fp_lesions / probed, 4) if probed else None,
        "scans": probed,
    }


def define_flags() -> None:
    flags.DEFINE_string("shards", None, "Glob of shard files with labelled scans.", required=True)
    flags.DEFINE_string("checkpoint", None, "Workdir, step folder or model file (default: shipped model).")
    flags.DEFINE_list("peaks", ["200", "350", "600"], "Peak HU of the inserted standard lesion.")
    flags.DEFINE_float("sigma_mm", 1.0, "In-plane SD (mm) of the inserted Gaussian disc.")
    flags.DEFINE_string("protocol", None, "Probe only scans of this protocol (cardiac / chest).")
    flags.DEFINE_integer("max_scans", 0, "Stop after this many probed scans (0: all).")
    flags.DEFINE_list(
        "grow_px",
        [str(k) for k in GROW_PX],
        "In-plane pixels the baseline prediction is grown into >= 130 HU voxels, one line each.",
    )
    flags.DEFINE_float(
        "surround_mm",
        0.0,
        "Also probe each peak ringed by this many mm of fat and of soft tissue (0: not).",
    )
    flags.DEFINE_string("out", None, "JSONL file to write (atomically); the lines are printed too.")


def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    rows = cli.run_or_exit(
        "calcjax.research.lesion_probe",
        lambda: probe(
            flags.FLAGS.shards,
            checkpoint_path=flags.FLAGS.checkpoint,
            peaks=tuple(float(p) for p in flags.FLAGS.peaks),
            sigma_mm=flags.FLAGS.sigma_mm,
            protocol=flags.FLAGS.protocol,
            max_scans=flags.FLAGS.max_scans,
            grow_px=tuple(int(k) for k in flags.FLAGS.grow_px),
            surround_mm=flags.FLAGS.surround_mm,
        ),
        (checkpoint.CheckpointError, model_file.ModelFileError),
    )
    text = "".join(json.dumps(r) + "\n" for r in rows)
    sys.stdout.write(text)
    if flags.FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(flags.FLAGS.out)), exist_ok=True)
        atomic.write_atomic(flags.FLAGS.out, text)


if __name__ == "__main__":
    define_flags()
    app.run(main)
