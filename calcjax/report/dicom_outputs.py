"""DICOM outputs of one scored scan: a Segmentation of the predicted calcium and a TID 1500 report.

Written with highdicom (the maintained library for these IODs) from the source series' own instances, for
the DICOM route only (a shard scan has no source instances). Both files are meant to go back to the PACS
beside the source, so, unlike every other calcjax output, they carry the source's patient and study
attributes (highdicom copies them from the source, as the IODs require); they are written only when asked
for (``calcjax.score --dicom_seg / --dicom_sr``), under ``OUT/dicom/``, named by the salted scan id.

**Segmentation** (``<scan_id>.seg.dcm``): BINARY, one segment per artery (1 LM, 2 LAD, 3 LCX, 4 RCA;
calcjax's label values), each with property category SCT 49755003 "Morphologically Abnormal Structure",
property type SCT 5540006 "Calcium" and the artery as its anatomic region (SCT codes from pydicom's
dictionary), algorithm type AUTOMATIC with calcjax's name, version and model. Frame ``z`` of the mask
references source instance ``z`` (the reader's z order); empty frames are left out (highdicom's default);
:func:`read_seg_labels` rebuilds the label volume from it on the source grid.

**Measurement report** (``<scan_id>.sr.dcm``, Comprehensive 3D SR, TID 1500): one measurement group for
the whole scan (finding site: coronary artery) with the Agatston score (DCM 112058 "Calcium score", method
DCM 112055 "Agatston scoring method"), the calcium volume (DCM 122660, mm3), the calcium mass (DCM 122661,
mg, only with a calibration factor), the number of lesions (SCT 246206008) and the risk category as a
qualitative evaluation (a private coding scheme, ``99CALCJAX``: DICOM has no code for the Agatston
categories); one group per artery with its Agatston score. Every group names the algorithm (name,
version, and ``model_sha256=...`` as its parameter). :func:`read_sr_values` reads the values back.

Series without UIDs (grouped by geometry) get new Study / Series / SOP Instance / Frame of Reference UIDs
in memory for the reference; the SEG and SR then point at instances that exist nowhere else, and a
warning says so (once per scan, without any header value).
"""

from __future__ import annotations

import io
import os

import highdicom as hd
import numpy as np
import pydicom
from absl import logging
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from calcjax.core import agatston
from calcjax.core.version import VERSION
from calcjax.io import atomic

ALGORITHM_NAME = "calcjax DenseRAUnet"
MANUFACTURER = "calcjax"
PRIVATE_SCHEME = "99CALCJAX"

ARTERY_CODES = {
    "LM": codes.SCT.LeftMainCoronaryArtery,
    "LAD": codes.SCT.LeftAnteriorDescendingCoronaryArtery,
    "LCX": codes.SCT.CircumflexCoronaryArtery,
    "RCA": codes.SCT.RightCoronaryArtery,
}
CATEGORY = Code("49755003", "SCT", "Morphologically Abnormal Structure")
CALCIUM = codes.SCT.Calcium
RISK_CATEGORY = Code("RISKCAT", PRIVATE_SCHEME, "Agatston risk category")
RISK_CODES = {
    0: Code("0", PRIVATE_SCHEME, "0: no coronary calcium (Agatston 0)"),
    1: Code("I", PRIVATE_SCHEME, "I: minimal (Agatston 1-10)"),
    2: Code("II", PRIVATE_SCHEME, "II: mild (Agatston 11-100)"),
    3: Code("III", PRIVATE_SCHEME, "III: moderate (Agatston 101-400)"),
    4: Code("IV", PRIVATE_SCHEME, "IV: severe (Agatston > 400)"),
}
SCORE_UNIT = codes.UCUM.NoUnits
VOLUME_UNIT = codes.UCUM.CubicMillimeter
MASS_UNIT = Code("mg", "UCUM", "milligram")
SEG_SUFFIX, SR_SUFFIX = ".seg.dcm", ".sr.dcm"


class DicomOutputError(ValueError):
    """A SEG or SR that cannot be written for this scan (the reason names no header value)."""


def source_datasets(files, scan_id: str) -> list[pydicom.Dataset]:
    """The source instances in the reader's z order (headers only), with UIDs made up where the series has
    none (same new Study / Series / Frame of Reference UID for all; a warning says so)."""
    files = list(files)
    if len(set(files)) != len(files):
        raise DicomOutputError(
            "multi-frame (enhanced) source: SEG / SR are written for single-frame series only"
        )
    dss = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    made = False
    shared = {k: hd.UID() for k in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")}
    for ds in dss:
        for key, uid in shared.items():
            if not getattr(ds, key, None):
                setattr(ds, key, uid)
                made = True
        if not getattr(ds, "SOPInstanceUID", None):
            ds.SOPInstanceUID = hd.UID()
            made = True
        if not getattr(ds, "SOPClassUID", None):
            ds.SOPClassUID = pydicom.uid.CTImageStorage
    if made:
        logging.warning(
            "scan %s: the source series has no UIDs; its SEG / SR reference new UIDs made up for it", scan_id
        )
    return dss


def write_scan_outputs(
    out: str,
    scan_id: str,
    source_files,
    pred: np.ndarray,
    row: dict,
    *,
    seg: bool,
    sr: bool,
    model_sha256: str,
    version: str = VERSION,
) -> list[str]:
    """Writes ``out/dicom/<scan_id>.seg.dcm`` (``seg``) and ``.sr.dcm`` (``sr``) of one scored scan;
    returns the names written. ``source_files``: the series' files in the reader's z order."""
    if not (seg or sr):
        return []
    sources = source_datasets(source_files, scan_id)
    written = []
    if seg:
        write_seg(os.path.join(out, "dicom", scan_id + SEG_SUFFIX), sources, pred, model_sha256=model_sha256,
                  version=version)  # fmt: skip
        written.append(scan_id + SEG_SUFFIX)
    if sr:
        write_sr(os.path.join(out, "dicom", scan_id + SR_SUFFIX), sources, row, model_sha256=model_sha256,
                 version=version)  # fmt: skip
        written.append(scan_id + SR_SUFFIX)
    return written


def _algorithm(model_sha256: str, version: str) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME,
        family=codes.cid7162.ArtificialIntelligence,
        version=version,
        parameters={"model_sha256": model_sha256},
    )


def write_seg(
    path: str, sources: list[pydicom.Dataset], pred: np.ndarray, *, model_sha256: str, version: str
) -> None:
    """Writes the DICOM Segmentation of ``pred`` (uint8 ``(Z, H, W)`` labels, 0 background, 1-4 arteries,
    frame ``z`` on ``sources[z]``) to ``path`` atomically."""
    if pred.shape != (len(sources), int(sources[0].Rows), int(sources[0].Columns)):
        raise DicomOutputError(
            f"mask {pred.shape} does not match the source series ({len(sources)} x "
            f"{sources[0].Rows} x {sources[0].Columns})"
        )
    algorithm = _algorithm(model_sha256, version)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i,
            segment_label=f"{name} calcium",
            segmented_property_category=CATEGORY,
            segmented_property_type=CALCIUM,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            anatomic_regions=[ARTERY_CODES[name]],
        )
        for i, name in enumerate(agatston.ARTERIES, start=1)
    ]
    masks = np.stack([pred == i for i in range(1, len(agatston.ARTERIES) + 1)], axis=-1)  # (Z, H, W, 4)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=masks.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=9901,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=ALGORITHM_NAME,
        software_versions=version,
        device_serial_number=model_sha256[:16],
        series_description="calcjax coronary calcium",
    )
    _save(seg, path)


def write_sr(
    path: str, sources: list[pydicom.Dataset], row: dict, *, model_sha256: str, version: str
) -> None:
    """Writes the TID 1500 measurement report of one score row (``calcjax.score.rows.score_row``) to
    ``path`` atomically; the source instances are its evidence."""
    algorithm = hd.sr.AlgorithmIdentification(
        name=ALGORITHM_NAME, version=version, parameters=[f"model_sha256={model_sha256}"]
    )
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=ALGORITHM_NAME, manufacturer_name=MANUFACTURER, model_name=version
        ),
    )
    site = [hd.sr.FindingSite(anatomic_location=codes.SCT.CoronaryArtery)]
    measurements = [
        _measurement(codes.DCM.CalciumScore, row["agatston"], SCORE_UNIT, algorithm),
        _measurement(codes.DCM.CalciumVolume, row["volume_mm3"], VOLUME_UNIT, algorithm, method=False),
        _measurement(codes.SCT.NumberOfLesions, row["num_lesions"], SCORE_UNIT, algorithm, method=False),
    ]
    if row.get("mass_mg") is not None:
        measurements.append(
            _measurement(codes.DCM.CalciumMass, row["mass_mg"], MASS_UNIT, algorithm, method=False)
        )
    groups = [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=hd.UID(), identifier="coronary calcium, all arteries"
            ),
            algorithm_id=algorithm,
            finding_sites=site,
            measurements=measurements,
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(name=RISK_CATEGORY, value=RISK_CODES[int(row["risk_category"])])
            ],
        )
    ]
    for name in agatston.ARTERIES:
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=hd.UID(), identifier=f"coronary calcium, {name}"
                ),
                algorithm_id=algorithm,
                finding_sites=[hd.sr.FindingSite(anatomic_location=ARTERY_CODES[name])],
                measurements=[
                    _measurement(
                        codes.DCM.CalciumScore, row["agatston_per_artery"][name], SCORE_UNIT, algorithm
                    )
                ],
            )
        )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.SCT.CoronaryArteryCalciumScore,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=sources,
        content=report,
        series_instance_uid=hd.UID(),
        series_number=9902,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
    )
    _save(sr, path)


def _measurement(name, value, unit, algorithm, *, method: bool = True) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=name,
        value=float(value),
        unit=unit,
        method=codes.DCM.AgatstonScoringMethod if method else None,
        algorithm_id=algorithm,
    )


def _save(ds: pydicom.Dataset, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    atomic.write_atomic(path, buf.getvalue())


def read_seg_labels(path: str, sources: list[pydicom.Dataset]) -> np.ndarray:
    """The uint8 ``(Z, H, W)`` label volume a SEG written by :func:`write_seg` holds on ``sources``' grid
    (frames looked up by the source SOP Instance UIDs; segment ``i`` -> label ``i``)."""
    seg = hd.seg.segread(path)
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    shape = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    out = np.zeros(shape, np.uint8)
    numbers = list(range(1, len(agatston.ARTERIES) + 1))
    referenced = {str(u) for _, _, u in seg.get_source_image_uids()}
    present = [i for i, u in enumerate(uids) if u in referenced]
    if present:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[uids[i] for i in present],
            segment_numbers=numbers,
            combine_segments=True,
            ignore_spatial_locations=True,
        )
        out[present] = pixels.astype(np.uint8)
    return out


def read_sr_values(path: str) -> dict:
    """What a report written by :func:`write_sr` says: ``agatston``, ``volume_mm3``, ``num_lesions``,
    ``mass_mg`` (or None), ``risk_category`` (0-4), ``agatston_per_artery``, ``algorithm`` (the lists of
    algorithm names, versions and parameters of the groups' algorithm identification)."""
    sr = hd.sr.srread(path)
    groups = sr.content.get_image_measurement_groups()
    code_to_category = {c.value: k for k, c in RISK_CODES.items()}
    out: dict = {"agatston_per_artery": {}, "mass_mg": None}
    artery_by_code = {c.value: n for n, c in ARTERY_CODES.items()}
    for g in groups:
        site = g.finding_sites[0].value.value  # the finding site item's coded value's code
        texts = [
            (item.ConceptNameCodeSequence[0].CodeValue, str(item.TextValue))
            for item in g[0].ContentSequence
            if item.ValueType == "TEXT"
        ]
        out["algorithm"] = tuple(
            [text for code, text in texts if code == c.value]
            for c in (codes.DCM.AlgorithmName, codes.DCM.AlgorithmVersion, codes.DCM.AlgorithmParameters)
        )
        values = {m.name.value: m.value for m in g.get_measurements()}
        if site in artery_by_code:
            out["agatston_per_artery"][artery_by_code[site]] = values[codes.DCM.CalciumScore.value]
            continue
        out["agatston"] = values[codes.DCM.CalciumScore.value]
        out["volume_mm3"] = values[codes.DCM.CalciumVolume.value]
        out["num_lesions"] = values[codes.SCT.NumberOfLesions.value]
        out["mass_mg"] = values.get(codes.DCM.CalciumMass.value)
        (evaluation,) = g.get_qualitative_evaluations(name=RISK_CATEGORY)
        out["risk_category"] = code_to_category[evaluation.value.value]
    return out


def render_seg_overlay(seg_path: str, source_files, png_path: str, *, slice_index: int | None = None) -> int:
    """Draws one source slice (window 40 / 400 HU) with the SEG's segments over it (LM, LAD, LCX, RCA in
    four colours) as read back by :func:`read_seg_labels`, whole and zoomed on the segments; the slice with
    the most segmented pixels unless ``slice_index``. Returns the slice index drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    sources = [pydicom.dcmread(f) for f in source_files]
    labels = read_seg_labels(seg_path, sources)
    z = int(np.argmax((labels > 0).sum(axis=(1, 2)))) if slice_index is None else slice_index
    ds = sources[z]
    hu = ds.pixel_array * float(getattr(ds, "RescaleSlope", 1)) + float(getattr(ds, "RescaleIntercept", 0))
    colours = ListedColormap(["#e41a1c", "#377eb8", "#4daf4a", "#ff7f00"])
    masked = np.ma.masked_equal(labels[z], 0)
    ys, xs = np.nonzero(labels[z])
    margin = max(12, min(hu.shape) // 16)  # pixels around the segments' bounding square
    if ys.size:
        cy, cx = (ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2
        half = max(ys.max() - ys.min(), xs.max() - xs.min()) // 2 + margin
    else:
        cy, cx, half = hu.shape[0] // 2, hu.shape[1] // 2, min(hu.shape) // 4
    box = (slice(max(0, cy - half), cy + half), slice(max(0, cx - half), cx + half))
    found = ", ".join(name for i, name in enumerate(agatston.ARTERIES, 1) if (labels[z] == i).any())
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.6), dpi=100)
    for ax, view, title in (
        (axes[0], (slice(None), slice(None)), f"slice {z}"),
        (axes[1], box, f"zoom: {found or 'no calcium'}"),
    ):
        ax.imshow(hu[view], cmap="gray", vmin=40 - 200, vmax=40 + 200)
        ax.imshow(masked[view] - 1, cmap=colours, vmin=0, vmax=3, alpha=0.8, interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle("DICOM SEG read back over its source slice (LM red, LAD blue, LCX green, RCA orange)")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return z
