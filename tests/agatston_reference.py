"""An independent Agatston for the tests: the textbook definition by loops over slices and lesions, with
scipy's 8-connected labelling (not calcjax's code)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def independent_agatston(hu, label, spacing, threshold=130.0):
    """``(total, per_artery (4,), volume_mm3, counted_lesions)`` of ``label`` 0-4 on ``hu`` ``(z, y, x)``."""
    dz, dy, dx = spacing
    total, per, volume, lesions = 0.0, np.zeros(4), 0.0, 0
    for k in range(hu.shape[0]):
        comp, n = ndimage.label((label[k] > 0) & (hu[k] >= threshold), structure=np.ones((3, 3)))
        for c in range(1, n + 1):
            px = comp == c
            area = px.sum() * dy * dx
            if area < 1.0:
                continue
            peak = hu[k][px].max()
            weight = 1 if peak < 200 else 2 if peak < 300 else 3 if peak < 400 else 4
            artery = int(np.bincount(label[k][px], minlength=5)[1:].argmax())  # ties: the lower label
            score = area * weight * dz / 3.0
            total, volume, lesions = total + score, volume + px.sum() * dz * dy * dx, lesions + 1
            per[artery] += score
    return total, per, volume, lesions
