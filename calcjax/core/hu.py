"""CT numbers and fields of view that several stages share: each defined once, here.

Hounsfield units (HU) are the scanner's calibrated attenuation: water 0, air -1000. The values below are
CT physics and scanner conventions, not tuned settings.
"""

from __future__ import annotations

AIR_HU = -1000.0  # air; also what padding, the outside of the field of view and off-image crops read as
CT_MIN_HU, CT_MAX_HU = -1024.0, 3071.0  # the 12-bit range of stored CT values with RescaleIntercept -1024
CARDIAC_FOV_MAX_MM = 260.0  # a reconstruction field of view at or below this is a cardiac (gated-sized) one
CHEST_FOV_MIN_MM = 300.0  # at or above this a chest one, holding the whole body
