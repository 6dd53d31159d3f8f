r"""The labelled real scans at hand as training data: one shard folder per scan.

  python -m data_prep.real_shards --real "$CALCJAX_REAL_DATA" --out real_shards [--workers 2] [--thick_mm 5]

``--real`` is the folder holding ``coca-sample/`` (the COCA release's layout) and ``qrm-canon/``. Each
labelled real scan becomes ``OUT/<name>/``, a shard folder (``data_prep.build``) with the one scan in its
``train`` split, so a run mixes them as sources (``data.sources``) and leaves one out by leaving out its
folder:

- ``gated-1``, ``gated-2``, ``gated-3``: the COCA gated scans with their calcium masks (the release's XML),
  numbered in the release's patient order (no input name reaches the outputs);
- ``chest-zero``: the COCA chest scan whose physician score is 0 (``deidentified_nongated/1``) with every
  voxel background: real aorta, valves, bone and chest wall that must not be called coronary;
- ``qrm``: the QRM calcification insert scan, every voxel of its nine cylinders at >= 130 HU labelled LAD
  (``QRM_LABEL``). A label needs an artery and the insert has none: LAD, the artery that most often carries
  coronary calcium, is the choice; the QRM scan teaches "calcium in soft tissue", and its artery name
  must never be read as a figure.

With ``--thick_mm T``, each gated scan also becomes ``OUT/gated-<k>-thick<T>/``: the same scan and mask as
contiguous T mm slices (``data_prep.build --reslice_mm``, ``calcjax.io.reslice``), the thick
reconstruction a non-gated chest protocol reads, so real coronary calcium is seen at chest slice
thickness. A variant is the same patient: ``calcjax.research.real_loo`` leaves it out with its scan.

The other chest scan (physician score 300, no mask) stays a scan-level check (``make real-eval``).
The labels calcjax makes (``chest-zero``, ``qrm``) are written as NIfTI into ``OUT/inputs/<name>/labels``
beside the links to the scan (``OUT/inputs/<name>/input``), which the build reads like any label tree;
``OUT/salt.txt`` salts every folder's scan ids.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from absl import flags

from calcjax.core import agatston, cli
from calcjax.data import qrm
from calcjax.io import deid, dicom, labels
from data_prep.builder import BuildOptions, build

QRM_LABEL = 2  # LAD: see the module docstring
QRM_MARGIN_MM = 1.5  # around each cylinder, as calcjax.data.qrm.score_inserts: partial volume, blooming
COCA_GATED = ("coca-sample", "Gated_release_final")
COCA_CHEST_ZERO = ("coca-sample", "deidentified_nongated", "1", "1")
QRM_DICOM = ("qrm-canon", "dicom")


@dataclasses.dataclass(frozen=True)
class RealScan:
    """One labelled real scan: its folder ``name`` under OUT and how its input is staged."""

    name: str
    kind: str  # "gated" (COCA XML), "zero" (all background) or "qrm" (inserts from HU)
    source: tuple[str, ...]  # its path under --real
    patient: str = ""  # gated: the release's patient folder


def real_scans(real: str) -> list[RealScan]:
    """The labelled real scans under ``real`` (those present)."""
    out = []
    patients = os.path.join(real, *COCA_GATED, "patient")
    if os.path.isdir(patients):
        for k, patient in enumerate(sorted(os.listdir(patients), key=lambda p: (len(p), p)), 1):
            out.append(RealScan(f"gated-{k}", "gated", COCA_GATED, patient))
    if os.path.isdir(os.path.join(real, *COCA_CHEST_ZERO)):
        out.append(RealScan("chest-zero", "zero", COCA_CHEST_ZERO))
    if os.path.isdir(os.path.join(real, *QRM_DICOM)):
        out.append(RealScan("qrm", "qrm", QRM_DICOM))
    return out


def _link(target: str, link: str) -> None:
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if os.path.islink(link) and os.readlink(link) == target:
        return
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(target, link)


def stage(real: str, scan: RealScan, folder: str) -> tuple[str, str | None]:
    """Links the scan into ``folder/input`` (the COCA layout kept for gated scans, whose XML the build
    finds) and writes the labels calcjax makes into ``folder/labels``; (input root, label tree or None)."""
    root, source = os.path.join(folder, "input"), os.path.abspath(os.path.join(real, *scan.source))
    if scan.kind == "gated":
        _link(os.path.join(source, "patient", scan.patient), os.path.join(root, "patient", scan.patient))
        _link(os.path.join(source, "calcium_xml"), os.path.join(root, "calcium_xml"))
        return root, None
    _link(source, os.path.join(root, "series"))
    vol = dicom.read_series(os.path.join(root, "series"))
    mask = np.zeros(vol.hu.shape, np.uint8) if scan.kind == "zero" else qrm_labels(vol.hu, vol.spacing)
    label_tree = os.path.join(folder, "labels")
    os.makedirs(label_tree, exist_ok=True)
    path = os.path.join(label_tree, "series.nii.gz")
    if not _holds(path, mask, vol.grid):  # kept as it is: a rerun must find the build's inputs unchanged
        labels.write_label_nifti(path, mask, vol.grid)
    return root, label_tree


def _holds(path: str, mask: np.ndarray, grid) -> bool:
    """Whether ``path`` is already this mask on this grid."""
    try:
        return bool(np.array_equal(labels.read_nifti_label(path, grid), mask))
    except (FileNotFoundError, labels.LabelError):
        return False


def qrm_labels(hu: np.ndarray, spacing) -> np.ndarray:
    """uint8 ``(Z, Y, X)``: ``QRM_LABEL`` at every voxel >= 130 HU inside the nine cylinders of the QRM
    insert (``calcjax.data.qrm``), 0 elsewhere; raises ``qrm.InsertNotFoundError`` naming the failed step."""
    inserts, _ = qrm.find_inserts(hu, spacing)
    cylinders = np.zeros(hu.shape, bool)
    for insert in inserts:
        cylinders |= qrm.insert_region(hu.shape, insert, spacing, QRM_MARGIN_MM)
    return ((hu >= agatston.CALCIUM_THRESHOLD_HU) & cylinders).astype(np.uint8) * np.uint8(QRM_LABEL)


def thick_name(name: str, thick_mm: float) -> str:
    """The folder of scan ``name`` as ``thick_mm`` slices (``gated-1-thick5``)."""
    return f"{name}-thick{thick_mm:g}"


def build_real_shards(
    real: str, out: str, *, workers: int = 1, progress: bool = True, thick_mm: float = 0.0
) -> dict[str, dict]:
    """Builds ``out/<name>`` for every labelled real scan under ``real`` (and, with ``thick_mm`` > 0,
    ``out/<name>-thick<T>`` for every gated one); {name: manifest}."""
    scans = real_scans(real)
    if not scans:
        raise FileNotFoundError(f"{real}: no coca-sample/ or qrm-canon/ with labelled real scans")
    os.makedirs(out, exist_ok=True)
    salt = deid.load_salt(out)
    manifests = {}
    for scan in scans:
        root, label_tree = stage(real, scan, os.path.join(out, "inputs", scan.name))
        options = BuildOptions(
            root, os.path.join(out, scan.name), split="train=1", labels_dir=label_tree, label_format="auto",
            workers=workers, salt=salt, progress=progress,
        )  # fmt: skip
        manifests[scan.name] = build(options)
        if thick_mm and scan.kind == "gated":
            variant = thick_name(scan.name, thick_mm)
            options = dataclasses.replace(options, out=os.path.join(out, variant), reslice_mm=float(thick_mm))
            manifests[variant] = build(options)
    return manifests


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so modules import side by side)."""
    flags.DEFINE_string("real", None, "Folder holding coca-sample/ and qrm-canon/.", required=True)
    flags.DEFINE_string("out", None, "Folder of the per-scan shard folders.", required=True)
    flags.DEFINE_integer("workers", 1, "Processes writing shards.", lower_bound=1)
    flags.DEFINE_float("thick_mm", 0.0, "Also build each gated scan as slices this thick, mm (0: no).",
                       lower_bound=0.0)  # fmt: skip


def main(argv):
    del argv
    f = flags.FLAGS
    manifests = cli.run_or_exit(
        "data_prep.real_shards",
        lambda: build_real_shards(f.real, f.out, workers=f.workers, thick_mm=f.thick_mm),
        (FileNotFoundError, dicom.DicomError, qrm.InsertNotFoundError, deid.SaltError),
    )
    for name, m in manifests.items():
        print(f"{name}: {m['num_scans']} scan, {m['num_records']} slices -> {os.path.join(f.out, name)}")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
