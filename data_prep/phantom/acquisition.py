"""CT acquisition presets for the phantom: ECG-gated cardiac calcium scans and non-gated chest CT.

Values from the literature (vendor calcium-scoring protocols, CT dose and noise studies):
- cardiac (ECG-gated calcium scan): 120 kVp, 3 mm slices at 3 mm increment, reconstruction FOV 200-250 mm
  (pixel 0.39-0.49 mm at 512x512), noise SD ~20 HU (seen 10-32; 19 +- 4 HU on a prospectively triggered
  64-row scanner, Acad Radiol 2009), coverage carina to apex ~120-150 mm, no motion;
- chest (non-gated): 120 kVp, slice thickness 1-5 mm with increment <= thickness, FOV 340-400 mm
  (pixel 0.66-0.78 mm), noise SD ~25 HU routine to 35-60 HU low dose (PMC6350468), whole-thorax coverage
  ~300 mm, cardiac motion blurring the RCA and LCX by 1-4 mm (Arcadi, WJR 2014);
- storage: int16, RescaleSlope 1, RescaleIntercept -1024, PixelPaddingValue -2000 outside a circular FOV.

World coordinates are DICOM LPS in mm with z = 0 at the aortic root (see ``anatomy``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from calcjax.core.hu import CT_MAX_HU, CT_MIN_HU

PROTOCOLS = ("cardiac", "chest")
RESCALE_INTERCEPT = -1024.0
PIXEL_PADDING_VALUE = -2000  # stored value outside the reconstruction circle
HU_MIN, HU_MAX = CT_MIN_HU, CT_MAX_HU  # the 12-bit CT range that int16 storage with intercept -1024 keeps


@dataclasses.dataclass(frozen=True)
class Acquisition:
    """One simulated acquisition.

    Attributes:
      protocol: ``cardiac`` (ECG-gated) or ``chest`` (non-gated).
      kvp: tube voltage (kV).
      size: matrix size (rows = columns).
      fov_mm: reconstruction diameter (mm); pixel spacing = fov_mm / size.
      fov_centre_xy: LPS (x, y) in mm of the image centre.
      thickness_mm: nominal slice thickness (SliceThickness, the slab each slice averages over).
      increment_mm: distance between slice positions (dz).
      z_top_mm, num_slices: z of the most superior slice and the number of slices (LPS mm).
      noise_sd_hu: standard deviation of the image noise (HU), per slice.
      motion_mm: in-plane cardiac motion amplitude blurring the RCA and LCX (0 when gated).
      motion_angle_rad: direction of that motion in the axial plane.
      kernel: reconstruction kernel name written to ConvolutionKernel.
      heart_rate_bpm: for gated scans (HeartRate, TriggerTime at 70% of the R-R interval).
    """

    protocol: str
    kvp: float
    size: int
    fov_mm: float
    fov_centre_xy: tuple[float, float]
    thickness_mm: float
    increment_mm: float
    z_top_mm: float
    num_slices: int
    noise_sd_hu: float
    motion_mm: float
    motion_angle_rad: float
    kernel: str
    heart_rate_bpm: float

    @property
    def pixel_mm(self) -> float:
        return self.fov_mm / self.size

    @property
    def gated(self) -> bool:
        return self.protocol == "cardiac"

    def slice_z(self) -> np.ndarray:
        """LPS z (mm) of each slice centre, ascending (index 0 = most inferior)."""
        return self.z_top_mm - self.increment_mm * np.arange(self.num_slices)[::-1]

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["pixel_mm"] = self.pixel_mm
        d["gated"] = self.gated
        return d


def sample_acquisition(protocol: str, rng: np.random.Generator, size: int = 512) -> Acquisition:
    """Draws one acquisition of ``protocol`` from the ranges in the module docstring."""
    if protocol == "cardiac":
        fov = float(rng.uniform(200.0, 250.0))
        thickness = increment = 3.0
        coverage = float(rng.uniform(120.0, 150.0))
        z_bottom = float(rng.uniform(-120.0, -110.0))  # below the apex (about -100 mm)
        noise = float(rng.uniform(15.0, 25.0))
        motion = 0.0
        centre = (float(rng.uniform(15.0, 25.0)), float(rng.uniform(-35.0, -25.0)))  # on the heart
        kernel = str(rng.choice(["B35f", "I30f", "Qr36"]))
    elif protocol == "chest":
        fov = float(rng.uniform(340.0, 400.0))
        thickness = float(rng.choice([1.0, 1.25, 2.5, 3.0, 5.0]))
        overlap = thickness >= 2.5 and rng.uniform() < 0.3
        increment = thickness / 2 if overlap else thickness
        coverage = float(rng.uniform(280.0, 320.0))
        z_bottom = float(rng.uniform(-175.0, -160.0))
        noise = float(rng.uniform(25.0, 60.0))
        motion = float(rng.uniform(1.0, 4.0))
        centre = (float(rng.uniform(-5.0, 5.0)), float(rng.uniform(-5.0, 10.0)))
        kernel = str(rng.choice(["B30f", "I31f", "B45f"]))
    else:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    num_slices = int(np.floor(coverage / increment)) + 1
    return Acquisition(
        protocol=protocol,
        kvp=120.0,
        size=int(size),
        fov_mm=fov,
        fov_centre_xy=centre,
        thickness_mm=thickness,
        increment_mm=increment,
        z_top_mm=z_bottom + (num_slices - 1) * increment,
        num_slices=num_slices,
        noise_sd_hu=noise,
        motion_mm=motion,
        motion_angle_rad=float(rng.uniform(0.0, np.pi)),
        kernel=kernel,
        heart_rate_bpm=float(rng.uniform(55.0, 75.0)),
    )
