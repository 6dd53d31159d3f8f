"""Writes a phantom volume as a real DICOM CT series (CT Image Storage, one file per slice).

Each file carries the geometry (ImagePositionPatient, ImageOrientationPatient, PixelSpacing,
SliceThickness, SpacingBetweenSlices), the acquisition (KVP, kernel, gating tags for ECG-gated scans),
int16 storage with RescaleSlope 1 / RescaleIntercept -1024 and PixelPaddingValue -2000 outside the
circular reconstruction field of view, consistent Study / Series / Frame-of-Reference UIDs, and a
made-up PatientName and PatientID (so tests can prove identifying values never leak downstream).

Files are named ``IM-0001-NNNN.dcm`` by InstanceNumber, which counts from the most superior slice down,
as many scanners export: file order is *descending* z, the opposite of the volume's index order.
UIDs derive from the seed, so a seed gives byte-identical files.
"""

from __future__ import annotations

import datetime
import os

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from data_prep.phantom.acquisition import PIXEL_PADDING_VALUE, RESCALE_INTERCEPT, Acquisition

IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.1634.1"  # a fixed, made-up implementation class UID


def _uid(*parts) -> str:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def write_series(
    folder: str,
    stored: np.ndarray,
    acq: Acquisition,
    *,
    seed: int,
    index: int,
    patient_name: str,
    patient_id: str,
) -> list[str]:
    """Writes ``stored`` (int16 ``(z, y, x)`` stored values, z ascending) as one DICOM file per slice.

    Returns the written paths (in InstanceNumber order, i.e. descending z).
    """
    nz, ny, nx = stored.shape
    study_uid = _uid("study", seed, index)
    series_uid = _uid("series", seed, index)
    frame_uid = _uid("frame", seed, index)
    date = (datetime.date(2020, 1, 1) + datetime.timedelta(days=int(seed * 97 + index * 13) % 1500)).strftime(
        "%Y%m%d"
    )
    cx, cy = acq.fov_centre_xy
    px = acq.pixel_mm
    x0 = cx - (nx - 1) / 2.0 * px
    y0 = cy - (ny - 1) / 2.0 * px
    zs = acq.slice_z()
    gated = acq.gated
    paths = []
    for k in range(nz - 1, -1, -1):
        instance = nz - k
        sop_uid = _uid("sop", seed, index, k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = IMPLEMENTATION_UID
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19550101"
        ds.PatientSex = "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "093000"
        ds.AccessionNumber = f"ACC{seed:04d}{index:05d}"
        ds.StudyID = f"{index + 1}"
        ds.Manufacturer = "calcjax"
        ds.ManufacturerModelName = "phantom"
        ds.InstitutionName = "calcjax phantom site"
        ds.StudyDescription = "CT Calcium Score" if gated else "CT Thorax"
        ds.SeriesDescription = (
            f"CaScore {acq.thickness_mm:g} {acq.kernel}"
            if gated
            else f"Thorax {acq.thickness_mm:g} {acq.kernel}"
        )
        ds.ProtocolName = "Calcium Score" if gated else "Thorax routine"
        ds.BodyPartExamined = "HEART" if gated else "CHEST"
        ds.SeriesNumber = 2
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = instance
        ds.PatientPosition = "HFS"
        ds.KVP = f"{acq.kvp:g}"
        ds.XRayTubeCurrent = 80 if gated else 120
        ds.ConvolutionKernel = acq.kernel
        ds.ReconstructionDiameter = f"{acq.fov_mm:.2f}"
        ds.GantryDetectorTilt = "0"
        ds.SliceThickness = f"{acq.thickness_mm:g}"
        ds.SpacingBetweenSlices = f"{acq.increment_mm:g}"
        if gated:
            ds.HeartRate = int(round(acq.heart_rate_bpm))
            ds.TriggerTime = f"{0.7 * 60000.0 / acq.heart_rate_bpm:.1f}"
            ds.CardiacNumberOfImages = 1
        ds.ImagePositionPatient = [f"{x0:.4f}", f"{y0:.4f}", f"{zs[k]:.4f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceLocation = f"{zs[k]:.4f}"
        ds.PixelSpacing = [f"{px:.6f}", f"{px:.6f}"]
        ds.PositionReferenceIndicator = ""
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.PixelPaddingValue = PIXEL_PADDING_VALUE
        ds.RescaleIntercept = f"{RESCALE_INTERCEPT:g}"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.PixelData = np.ascontiguousarray(stored[k], dtype="<i2").tobytes()
        path = os.path.join(folder, f"IM-0001-{instance:04d}.dcm")
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths
