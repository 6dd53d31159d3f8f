"""One phantom scan end to end: acquisition, anatomy, calcium, noise, ground truth, files.

The scan ``index`` of a run with ``seed`` draws everything from ``SeedSequence([seed, index])``, so the same
(seed, index, protocol, size) gives byte-identical DICOM pixel data and files. Each scan aims at a risk
category (``target_category``); lesion sizes are rescaled (up to ``MAX_TRIES`` renderings) until the
reference Agatston of the written image falls in it, so a seeded set covers every category.

Noise is Gaussian, correlated in-plane (CT kernels; sigma 0.7 px) and scaled to the protocol's SD.

``version`` 2 (phantom v2; ``truth.json`` says which) changes what ``docs/realism`` showed the
real sample does differently, and nothing else: plaques (``calcium.plan_lesions``: lower peaks,
confluent clusters along the vessel), noise SD (cardiac 10-25, chest 12-35 HU, where v1's chest noise was
four times the sample's) and noise texture (correlation sigma drawn per scan, 0.7-1.6 px: the real gated
noise is coarser than v1's). Version 1 stays the default and byte-identical, since reference outputs
(``calcjax/model/shipped/reference_scores.csv``) and tests are pinned to it.

``version`` 3 is v2 plus anatomy and confounders (``anatomy_v3``, ``confounders_v3``): an adult-sized
body that a chest field of view is fitted to (body width + 5-40 mm), a gated field of view centred on
the heart (+-5 mm), a larger heart against the anterior chest wall with atria, a
ventricular cavity, the pulmonary trunk and fat-filled grooves around the coronaries, lung vessel trees,
and rib ends, costal cartilage calcification, calcified lymph nodes, sternal wires and pacemaker leads.
Its extra draws come after v2's, so v2 scans stay what they were.

``version`` 4 is v3 with a thin fat sleeve around the coronaries (0.5-2.5 mm instead of 5-8 mm,
``anatomy_v3.GROOVE_FAT_MM``: the real sample's lesions sit in far less fat than v3's) and nothing else:
the same draws, so scan (seed, index) of v4 is its v3 twin but for the fat around the arteries.

``gated_caudal_mm`` (any version; cardiac scans only) extends a gated scan's coverage below the default by
a length drawn per scan, the top slice unchanged: the real gated sample covers 135-168 mm (46-57 slices, 3 mm
apart) where the default draws 120-150 mm, and its extra slices are upper abdomen (liver, stomach), where
a model trained on default-coverage phantoms (run D2, docs/experiments/) put 9 of its 27 false positives on
the real sample. The length comes from
its own stream (``SeedSequence([seed, index, CAUDAL_STREAM])``), so acquisition and anatomy are those of
the scan without it; the noise, confounders and lesions drawn after the extra slices are rendered differ.

``plaque_peak_max_hu`` (any version) raises the top weight band's upper edge for coronary plaques from
900 HU (``calcium.weight_bands_hu``): real dense plaques peak higher, and the two brightest real lesions
(834 and 934 HU, a third of the real sample's calcium voxels) were what phantom-trained models missed
(docs/experiments/, lesion probe by peak band). The same draws: only the top band's plaque peaks
change (and with them, through the size search, possibly the lesions' scale).

``bulky_plaque_probability`` (any version) gives a scan with calcium, with that probability, one more
plaque, wider than its vessel (``calcium.bulky_plaque``), drawn from its own stream (``SeedSequence([seed,
index, BULKY_STREAM])``): the other plaques are the same draws (the size search may rescale them), and 0
gives the scan without the option. The real sample's largest lesion (934 HU) spans 6 x 10 mm in-plane,
wider than any phantom plaque of that brightness.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import numpy as np
from scipy import ndimage

from calcjax.core import agatston
from calcjax.core.hu import AIR_HU
from calcjax.io import labels
from calcjax.io.geometry import Grid
from data_prep.phantom import anatomy_v3, annotations, calcium, confounders_v3, dicom_series
from data_prep.phantom.acquisition import (
    HU_MAX,
    HU_MIN,
    PIXEL_PADDING_VALUE,
    RESCALE_INTERCEPT,
    Acquisition,
    sample_acquisition,
)
from data_prep.phantom.anatomy import ARTERY_LABELS, aorta_centerline, coronary_centerlines, sample_patient
from data_prep.phantom.tissue import AxialGrid, render_tissue

MAX_TRIES = 8
MAX_LESION_MM = 11.0  # largest lesion extent the size search may reach ("sizes ... to ~10 mm")
NOISE_CORRELATION_PX = 0.7
V2_NOISE_SD_HU = {"cardiac": (10.0, 25.0), "chest": (12.0, 35.0)}
V2_NOISE_CORRELATION_PX = (0.7, 1.6)
VERSIONS = (1, 2, 3, 4)
CAUDAL_STREAM = 1  # third SeedSequence word of the gated_caudal_mm draw
BULKY_STREAM = 2  # third SeedSequence word of the bulky_plaque_probability draws
CHEST_FOV_MARGIN_MM = (5.0, 40.0)  # v3: chest FOV = body width + this (clipped to 320-480 mm)


@dataclasses.dataclass
class PhantomScan:
    """A generated scan held in memory.

    Attributes:
      name: folder name of the scan.
      acquisition: the acquisition it simulates.
      grid: its voxel grid (LPS geometry).
      hu: ``(z, y, x)`` int16 HU as written (-1000, air, outside the FOV where the files hold padding).
      stored: ``(z, y, x)`` int16 stored DICOM values (PixelPaddingValue outside the FOV).
      label: ``(z, y, x)`` uint8 coronary calcium labels.
      truth: the ``truth.json`` dict.
    """

    name: str
    acquisition: Acquisition
    grid: Grid
    hu: np.ndarray
    stored: np.ndarray
    label: np.ndarray
    truth: dict


def protocol_of(index: int, protocol: str) -> str:
    """The protocol of scan ``index``: ``mixed`` alternates cardiac (even) and chest (odd)."""
    if protocol == "mixed":
        return "cardiac" if index % 2 == 0 else "chest"
    return protocol


def scan_name(seed: int, index: int, protocol: str) -> str:
    return f"phantom-s{seed}-{index:04d}-{protocol}"


def _noise(shape, sd: float, rng: np.random.Generator, sigma_px: float = NOISE_CORRELATION_PX) -> np.ndarray:
    n = rng.standard_normal(shape, dtype=np.float32)
    ndimage.gaussian_filter(n, sigma=(0, sigma_px, sigma_px), output=n)
    delta = np.zeros((15, 15), dtype=np.float64)
    delta[7, 7] = 1.0
    gain = np.sqrt((ndimage.gaussian_filter(delta, sigma_px) ** 2).sum())
    n *= np.float32(sd / gain)
    return n


def _is_mm_range(r) -> bool:
    """Whether ``r`` is a (low, high) pair of lengths in mm with 0 <= low <= high."""
    return len(r) == 2 and 0.0 <= r[0] <= r[1]


def check_options(
    version: int,
    groove_fat_mm: tuple[float, float] | None = None,
    gated_caudal_mm: tuple[float, float] | None = None,
    plaque_peak_max_hu: float | None = None,
    bulky_plaque_probability: float | None = None,
) -> None:
    """Raises ValueError naming the first of :func:`generate_scan`'s options that it cannot use."""
    if version not in VERSIONS:
        raise ValueError(f"phantom version {version!r}; expected one of {VERSIONS}")
    if groove_fat_mm is not None and (version < 3 or not _is_mm_range(groove_fat_mm)):
        raise ValueError(f"groove_fat_mm {groove_fat_mm!r}: needs version >= 3 and 0 <= low <= high")
    if gated_caudal_mm is not None and not _is_mm_range(gated_caudal_mm):
        raise ValueError(f"gated_caudal_mm {gated_caudal_mm!r}: needs 0 <= low <= high")
    calcium.weight_bands_hu(plaque_peak_max_hu)  # the plaque maximum's own check
    if bulky_plaque_probability is not None and not 0.0 <= bulky_plaque_probability <= 1.0:
        raise ValueError(f"bulky_plaque_probability {bulky_plaque_probability!r}: needs 0 <= p <= 1")


def generate_scan(
    seed: int,
    index: int,
    protocol: str,
    *,
    size: int = 512,
    target_category: int | None = None,
    version: int = 1,
    groove_fat_mm: tuple[float, float] | None = None,
    gated_caudal_mm: tuple[float, float] | None = None,
    plaque_peak_max_hu: float | None = None,
    bulky_plaque_probability: float | None = None,
) -> PhantomScan:
    """Generates scan ``index`` of the run ``seed`` in memory (see module docstring: ``version`` 1-4).
    ``groove_fat_mm``: (low, high) mm of the coronary fat sleeve, drawn uniformly per scan, instead of the
    version's range (versions 3 and 4 only; the same draws, so only the sleeve changes).
    ``gated_caudal_mm``: (low, high) mm of extra coverage below a cardiac scan, drawn uniformly per scan
    (module docstring); chest scans ignore it.
    ``plaque_peak_max_hu``: the top Agatston weight band's upper edge for coronary plaques (HU, before
    noise; default 900: ``calcium.weight_bands_hu``; the same draws, so only plaque peaks change).
    ``bulky_plaque_probability``: the chance of one bulky plaque in a scan with calcium (module docstring)."""
    check_options(version, groove_fat_mm, gated_caudal_mm, plaque_peak_max_hu, bulky_plaque_probability)
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    acq = sample_acquisition(protocol, rng, size)
    caudal_mm = None
    if gated_caudal_mm is not None and protocol == "cardiac":
        caudal_rng = np.random.default_rng(np.random.SeedSequence([seed, index, CAUDAL_STREAM]))
        caudal_mm = float(caudal_rng.uniform(*gated_caudal_mm))
        extra = int(np.floor(caudal_mm / acq.increment_mm))  # slices added below; the top one stays
        acq = dataclasses.replace(acq, num_slices=acq.num_slices + extra)
    noise_sigma_px = NOISE_CORRELATION_PX
    if version >= 2:
        acq = dataclasses.replace(acq, noise_sd_hu=float(rng.uniform(*V2_NOISE_SD_HU[protocol])))
        noise_sigma_px = float(rng.uniform(*V2_NOISE_CORRELATION_PX))
    patient = sample_patient(rng)
    if target_category is None:
        target_category = index % 5
    lung_vessels = []
    if version >= 3:
        patient = anatomy_v3.enlarge(patient, rng, version=version, groove_fat_mm=groove_fat_mm)
        lung_vessels = anatomy_v3.lung_vessel_trees(patient, rng)
        if protocol == "chest":
            fov = 2.0 * patient.body_axes[0] + float(rng.uniform(*CHEST_FOV_MARGIN_MM))
            acq = dataclasses.replace(acq, fov_mm=float(np.clip(fov, 320.0, 480.0)))
        else:  # a gated FOV is centred on the heart, which v3 moves with the body
            centre = patient.heart_centre[:2] + rng.uniform(-5.0, 5.0, 2)
            acq = dataclasses.replace(acq, fov_centre_xy=(float(centre[0]), float(centre[1])))
    coronaries = coronary_centerlines(patient)
    zs = acq.slice_z()
    aorta = aorta_centerline(patient, float(zs[0]))
    base = render_tissue(acq, patient, list(coronaries.values()), aorta, rng, lung_vessels)
    noise = _noise(base.shape, acq.noise_sd_hu, rng, noise_sigma_px)
    axial = AxialGrid.from_acquisition(acq)
    off = (np.arange(size) - (size - 1) / 2.0) * acq.pixel_mm
    in_fov = (off[None, :] ** 2 + off[:, None] ** 2) <= (acq.fov_mm / 2.0) ** 2

    confounders = calcium.plan_confounders(patient, coronaries, aorta, acq, rng)
    if version >= 3:
        confounders += confounders_v3.plan_confounders_v3(patient, acq, rng)
    lesions = calcium.plan_lesions(target_category, coronaries, acq, rng, version, plaque_peak_max_hu)
    bulky = 0
    if bulky_plaque_probability is not None and target_category > 0:
        bulky_rng = np.random.default_rng(np.random.SeedSequence([seed, index, BULKY_STREAM]))
        if bulky_rng.uniform() < bulky_plaque_probability:
            lesions.append(calcium.bulky_plaque(coronaries, acq, bulky_rng))
            bulky = 1
    conf_hu = np.full(base.shape, -np.inf, dtype=np.float32)
    conf_id = np.zeros(base.shape, dtype=np.int32)
    calcium.render_blobs(confounders, base, axial, acq, conf_hu, conf_id, first_id=1)
    # owner id -> label: confounders 0, lesions their artery.
    first_lesion = len(confounders) + 1
    lut = np.zeros(first_lesion + len(lesions), dtype=np.uint8)
    for j, lesion in enumerate(lesions):
        lut[first_lesion + j] = lesion.label

    grid = Grid(
        shape=base.shape,
        spacing=(acq.increment_mm, acq.pixel_mm, acq.pixel_mm),
        origin=(float(axial.xs[0]), float(axial.ys[0]), float(zs[0])),
    )
    spacing = grid.spacing
    scale, lo, hi = 1.0, 0.0, np.inf
    longest = max((2 * b.semi_mm.max() for b in lesions if b.scalable), default=1.0)
    max_scale = MAX_LESION_MM / longest
    for _ in range(MAX_TRIES):
        owner_hu, owner_id = conf_hu.copy(), conf_id.copy()
        calcium.render_blobs(
            lesions, base, axial, acq, owner_hu, owner_id, first_id=first_lesion, scale=scale
        )
        noise_free = np.maximum(base, owner_hu)
        hu = np.clip(np.rint(noise_free + noise), HU_MIN, HU_MAX).astype(np.int16)
        hu[:, ~in_fov] = np.int16(AIR_HU)  # what a reader maps PixelPaddingValue to
        label = np.where(
            (owner_hu >= calcium.SUPPORT_HU) & agatston.candidate_mask(hu), lut[owner_id], 0
        ).astype(np.uint8)
        ref = agatston.score(hu, label, spacing, kvp=acq.kvp)
        got = ref["risk_category"]
        if got == target_category or not lesions:
            break
        # Bisection on the size factor (geometric), bracketing the target category.
        if got < target_category:
            lo = scale
            scale = min(scale * 1.5 if hi == np.inf else np.sqrt(scale * hi), max_scale)
        else:
            hi = scale
            scale = scale / 1.5 if lo == 0.0 else np.sqrt(scale * lo)

    stored = (hu.astype(np.int32) - int(RESCALE_INTERCEPT)).astype(np.int16)
    stored[:, ~in_fov] = PIXEL_PADDING_VALUE
    name = scan_name(seed, index, protocol)
    truth = _truth(
        name, acq, grid, hu, label, owner_id, lesions, confounders, first_lesion, ref, target_category, scale
    )
    truth["phantom_version"] = version
    if version >= 3:
        truth["groove_fat_mm"] = round(patient.groove_fat_mm, 3)
    if caudal_mm is not None:
        truth["gated_caudal_mm"] = round(caudal_mm, 3)
    if plaque_peak_max_hu is not None:
        truth["plaque_peak_max_hu"] = float(plaque_peak_max_hu)
    if bulky_plaque_probability is not None:
        truth["bulky_plaque_probability"] = float(bulky_plaque_probability)
        truth["bulky_plaques"] = bulky  # the last entry of lesions when 1
    return PhantomScan(name, acq, grid, hu, stored, label, truth)


def _truth(
    name, acq, grid, hu, label, owner_id, lesions, confounders, first_lesion, ref, target_category, scale
) -> dict:
    lesion_rows = []
    for j, blob in enumerate(lesions):
        mine = (owner_id == first_lesion + j) & (label > 0)
        centre_idx = grid.lps_to_index(blob.centre)
        lesion_rows.append(
            {
                "artery": blob.artery,
                "label": int(ARTERY_LABELS[blob.artery]),
                "centre_mm": [round(float(c), 3) for c in blob.centre],
                "centre_index_zyx": [round(float(c), 2) for c in centre_idx],
                "size_mm": [round(float(2 * s), 3) for s in blob.semi_mm * (scale if blob.scalable else 1.0)],
                "density_hu": round(blob.density_hu, 1),
                "target_peak_hu": round(blob.target_peak_hu, 1),
                "peak_noise_free_hu": round(blob.peak_noise_free_hu, 1),
                "peak_hu": int(hu[mine].max()) if mine.any() else None,
                "num_voxels": int(mine.sum()),
                "motion_mm": [round(float(m), 3) for m in blob.motion],
            }
        )
    conf_rows = [
        {
            "kind": blob.kind,
            "centre_mm": [round(float(c), 3) for c in blob.centre],
            "peak_noise_free_hu": round(blob.peak_noise_free_hu, 1),
        }
        for blob in confounders
    ]
    return {
        "scan": name,
        "protocol": acq.protocol,
        "acquisition": acq.to_json(),
        "geometry": {
            "shape_zyx": list(grid.shape),
            "spacing_zyx_mm": list(grid.spacing),
            "origin_lps_mm": list(grid.origin),
            "affine_ras": grid.affine_ras().tolist(),
        },
        "target_risk_category": int(target_category),
        "lesions": lesion_rows,
        "confounders": conf_rows,
        "scoring": {"threshold_hu": ref["threshold_hu"], "min_area_mm2": 1.0, "kvp": acq.kvp},
        "reference": {
            "agatston": ref["agatston"],
            "agatston_per_artery": ref["agatston_per_artery"],
            "volume_mm3": ref["volume_mm3"],
            "volume_per_artery": ref["volume_per_artery"],
            "risk_category": ref["risk_category"],
            "risk_category_name": ref["risk_category_name"],
            "num_lesions": ref["num_lesions"],
            "num_label_voxels": int((label > 0).sum()),
        },
    }


def write_scan(scan: PhantomScan, out_dir: str, *, seed: int, index: int) -> str:
    """Writes a scan to ``out_dir/<name>/`` atomically (a temporary folder renamed at the end)."""
    final = os.path.join(out_dir, scan.name)
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{scan.name}.", dir=out_dir)
    try:
        dicom_dir = os.path.join(tmp, "dicom")
        os.makedirs(dicom_dir)
        dicom_series.write_series(
            dicom_dir,
            scan.stored,
            scan.acquisition,
            seed=seed,
            index=index,
            patient_name=f"Phantom^Patient{index:04d}^S{seed}",
            patient_id=f"CJX-PID-{seed:03d}-{index:05d}",
        )
        labels.write_label_nifti(os.path.join(tmp, "label.nii.gz"), scan.label, scan.grid)
        annotations.write_coca_xml(os.path.join(tmp, "calcium.xml"), scan.label, scan.hu, scan.grid)
        with open(os.path.join(tmp, "truth.json"), "w") as f:
            json.dump(scan.truth, f, indent=1)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
