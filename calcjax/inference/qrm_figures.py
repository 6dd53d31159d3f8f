r"""A model on a real scanner's known answer: what it calls calcium in the QRM calcification insert.

``calcjax.data.qrm`` finds and scores the insert's nine hydroxyapatite cylinders from HU alone. This module
asks the model the same question: the reference is every voxel at >= 130 HU inside the cylinders of the
six large and medium inserts (``REFERENCE_SIZES``; the 1 mm inserts are mostly below the threshold), each
cylinder of radius ``size / 2 + MARGIN_MM`` over the insert's slices (``calcjax.data.qrm.insert_region``).
The inserts are calcium in about 75 HU soft tissue, scanned on a real scanner (noise, kernel, blooming),
far from any coronary artery: the figure measures how a model answers to calcium in soft tissue, which is
what phantom-trained models were found to miss in real plaques; it is not a coronary
calcium score (a model that reads anatomy may rightly doubt an insert that no artery leads to).

Figures (:func:`figures`, keys ``{prefix}_...``):

- ``calcium_probability``: the mean over reference voxels of the model's calcium probability
  (1 - P(background), ``Predictor.calcium_probability``);
- ``voxel_recall``: the share of reference voxels the model labels calcium (P(background) < 0.5);
- ``agatston`` / ``agatston_reference``: the Agatston score of the predicted calcium inside the nine
  cylinders / of all their >= 130 HU voxels (``calcjax.core.agatston.score``);
- ``fp_voxels_outside``: voxels labelled calcium outside the nine cylinders (the phantom has no other
  calcium; its shell, spine and calibration rod are there to be rejected).

No identifying DICOM value is read into the figures (the series gives HU and spacing only).

The command ``python -m calcjax.research.qrm_check`` prints these figures for a model; training logs them
at each validation with ``data.qrm_val_dicom`` (``calcjax.train.evaluation``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from calcjax.core import agatston
from calcjax.data import qrm

REFERENCE_SIZES = ("large", "medium")
MARGIN_MM = 1.5  # as calcjax.data.qrm.score_inserts: partial volume and blooming around each cylinder


@dataclasses.dataclass(frozen=True)
class QrmReference:
    """One QRM scan and its reference: ``hu`` float32 ``(Z, Y, X)``, ``spacing`` ``(dz, dy, dx)`` mm,
    ``reference`` bool (the large and medium inserts' voxels at >= 130 HU), ``cylinders`` bool (all nine
    cylinders), ``agatston_reference`` (Agatston of every >= 130 HU voxel in the cylinders)."""

    hu: np.ndarray
    spacing: tuple[float, float, float]
    reference: np.ndarray
    cylinders: np.ndarray
    agatston_reference: float

    @classmethod
    def from_volume(cls, hu: np.ndarray, spacing) -> QrmReference:
        """Finds the insert in ``hu`` (raises ``calcjax.data.qrm.InsertNotFoundError`` with the failed
        step)."""
        hu = np.asarray(hu, np.float32)
        spacing = tuple(float(s) for s in spacing)
        inserts, _ = qrm.find_inserts(hu, spacing)
        bright = hu >= agatston.CALCIUM_THRESHOLD_HU
        cylinders = np.zeros(hu.shape, bool)
        reference = np.zeros(hu.shape, bool)
        for ins in inserts:
            region = qrm.insert_region(hu.shape, ins, spacing, MARGIN_MM)
            cylinders |= region
            if ins.size in REFERENCE_SIZES:
                reference |= region & bright
        if not reference.any():
            raise qrm.InsertNotFoundError("no voxel of the large and medium inserts reaches 130 HU")
        score = agatston.score(hu, (cylinders & bright).astype(np.uint8), spacing)["agatston"]
        return cls(hu, spacing, reference, cylinders, float(score))

    @classmethod
    def load(cls, dicom_dir: str) -> QrmReference:
        """Reads the QRM series in ``dicom_dir`` (``calcjax.io.dicom.read_series``) and finds the insert;
        a failure names the folder."""
        from calcjax.io import dicom

        vol = dicom.read_series(dicom_dir)
        try:
            return cls.from_volume(vol.hu, vol.spacing)
        except qrm.InsertNotFoundError as e:
            raise qrm.InsertNotFoundError(f"{dicom_dir}: not a QRM calcification insert scan ({e})") from None


def figures(
    ref: QrmReference, labels: np.ndarray, calcium_probability: np.ndarray, prefix: str = "qrm"
) -> dict:
    """The module docstring's figures for a model's ``labels`` uint8 and ``calcium_probability`` float
    ``(Z, Y, X)`` on ``ref``'s grid."""
    if labels.shape != ref.hu.shape or calcium_probability.shape != ref.hu.shape:
        raise ValueError(
            f"prediction shapes {labels.shape} / {calcium_probability.shape} do not match the scan "
            f"{ref.hu.shape}"
        )
    calcium = labels > 0
    inside = (calcium & ref.cylinders).astype(np.uint8)
    return {
        f"{prefix}_calcium_probability": float(calcium_probability[ref.reference].mean()),
        f"{prefix}_voxel_recall": float((calcium & ref.reference).sum() / ref.reference.sum()),
        f"{prefix}_agatston": float(agatston.score(ref.hu, inside, ref.spacing)["agatston"]),
        f"{prefix}_agatston_reference": ref.agatston_reference,
        f"{prefix}_fp_voxels_outside": int((calcium & ~ref.cylinders).sum()),
    }


def evaluate(predictor, ref: QrmReference, prefix: str = "qrm") -> dict:
    """:func:`figures` of a ``calcjax.inference.predictor.Predictor`` (its current weights) on ``ref``: one
    forward pass, calcium where the probability exceeds 0.5 (the labels' rule)."""
    hu = np.clip(np.rint(ref.hu), np.iinfo(np.int16).min, np.iinfo(np.int16).max).astype(np.int16)
    probability = predictor.calcium_probability(hu, ref.spacing)
    return figures(ref, (probability > 0.5).astype(np.uint8), probability, prefix)
