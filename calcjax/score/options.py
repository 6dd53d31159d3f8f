"""What one scoring job is asked to do: every setting of ``calcjax.score`` in one dataclass.

``python -m calcjax.score`` builds it from its flags; the Python API builds it directly
(``calcjax.score.cohort.score_cohort(ScoreOptions(out=..., dicom_dir=...))``).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ScoreOptions:
    """The settings of one scoring job.

    Inputs (exactly one of ``shards`` / ``dicom_dir`` / ``nifti_dir``): ``shards``, a glob of shard files;
    ``dicom_dir``, a folder searched for CT series; ``nifti_dir``, a folder of ``*.nii.gz`` CT volumes in
    HU. ``labels_dir``: a mirrored tree of reference labels (DICOM route). ``salt_file``: the scan-id salt.

    Model: ``checkpoint_path`` (a training workdir, a step folder or a model file; ``None``: the shipped
    model) and ``which`` (``best`` / ``latest`` of a workdir); ``batch_size`` slices per forward pass (0: 4
    per local device); ``calcium_probability``: a voxel is calcium where the model's calcium probability
    exceeds it (0.5: calcium more likely than not). ``workers``: processes that read and prepare the next
    scans (heart region included) while the forward pass runs, the rows and files of the last one written
    beside it (``calcjax.score.pipeline``; the same rows); 0 runs the stages one after another in this
    process. ``forward_in_heart_box``: the network runs only on the heart region's boxes
    (``calcjax.score.stages``; models on native pixels), which changes a few labels inside the region: part of
    the run record.

    Post-processing: ``use_heart_region`` keeps predicted calcium only in the heart's neighbourhood;
    ``lesion_completion_mm2`` completes each predicted lesion to its >= threshold component up to this
    in-plane area (mm^2; 0: off). Scoring: ``mass_calibration`` (mg per HU x mm^3; mass reported when
    given), ``kvp_specific_threshold`` (the calcium threshold from the scan's kVp).

    Outputs in ``out``: ``resume`` goes on with a folder already scored; ``save_masks`` writes NIfTI
    masks; ``dicom_seg`` / ``dicom_sr`` write DICOM SEG / TID 1500 SR (DICOM route); ``num_bootstrap``
    resamples for the report's CIs; ``progress`` shows a progress bar. ``reference_scores_path``: a sheet
    of scan-level reference scores (CSV or .xlsx; ``reference_key_column``, ``reference_key_suffix``:
    ``calcjax.io.reference_scores``).
    """

    out: str
    checkpoint_path: str | None = None
    shards: str | None = None
    dicom_dir: str | None = None
    nifti_dir: str | None = None
    labels_dir: str | None = None
    salt_file: str | None = None
    which: str = "best"
    resume: bool = False
    save_masks: bool = False
    batch_size: int = 0
    mass_calibration: float | None = None
    kvp_specific_threshold: bool = False
    use_heart_region: bool = True
    lesion_completion_mm2: float = 0.0
    dicom_seg: bool = False
    dicom_sr: bool = False
    num_bootstrap: int = 1000
    progress: bool = True
    reference_scores_path: str | None = None
    reference_key_column: str | None = None
    reference_key_suffix: str = ""
    workers: int = 0
    calcium_probability: float = 0.5
    forward_in_heart_box: bool = False

    def __post_init__(self):
        inputs = [x for x in (self.shards, self.dicom_dir, self.nifti_dir) if x is not None]
        if len(inputs) != 1:
            raise ValueError("give exactly one of --shards, --dicom and --nifti")
        if self.dicom_dir is None and (self.dicom_seg or self.dicom_sr):
            raise ValueError("--dicom_seg / --dicom_sr need --dicom: only a DICOM scan has source instances")
        if not self.lesion_completion_mm2 >= 0:  # also refuses NaN
            raise ValueError(f"lesion_completion_mm2 must be >= 0 (0: off), got {self.lesion_completion_mm2}")
        object.__setattr__(self, "lesion_completion_mm2", float(self.lesion_completion_mm2))
        if not 0.0 < self.calcium_probability < 1.0:  # also refuses NaN
            raise ValueError(f"calcium_probability must lie in (0, 1), got {self.calcium_probability}")
        object.__setattr__(self, "calcium_probability", float(self.calcium_probability))
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0: no worker processes), got {self.workers}")

    @property
    def route(self) -> str:
        """``shards``, ``dicom`` or ``nifti``."""
        if self.shards is not None:
            return "shards"
        return "dicom" if self.dicom_dir is not None else "nifti"

    @property
    def score_kw(self) -> dict:
        """The keyword arguments of ``calcjax.score.rows.score_row`` these options set."""
        return dict(
            mass_calibration=self.mass_calibration, kvp_specific_threshold=self.kvp_specific_threshold
        )

    def run_record(self, model_sha256: str) -> dict:
        """What ``run.json`` holds: a resume with another model or other settings is refused. Settings
        added after a folder was scored appear only when asked, so older folders still resume."""
        record = {"model_sha256": model_sha256, "route": self.route, "heart_region": self.use_heart_region}
        record.update(self.score_kw)
        if self.dicom_seg or self.dicom_sr:
            record.update(dicom_seg=self.dicom_seg, dicom_sr=self.dicom_sr)
        if self.lesion_completion_mm2:
            record.update(lesion_completion_mm2=self.lesion_completion_mm2)
        if self.forward_in_heart_box:
            record.update(forward_in_heart_box=True)
        if self.calcium_probability != 0.5:
            record.update(calcium_probability=self.calcium_probability)
        return record
