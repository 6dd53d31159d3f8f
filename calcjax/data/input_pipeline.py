"""grain input pipelines over the ArrayRecord shards of ``data_prep.build``.

Training (``train_dataset``): an "epoch" is ``num_records`` slots; a seeded shuffle of the slots, repeated
(a new permutation each epoch); a slot below ``calcium_fraction * num_records`` draws a random slice with
calcium (from the manifest's index), any other slot a random slice without; decode; augmentation that keeps
anatomy (random crop, biased to contain calcium or else a calcium-like bright object; rotation within
+-``rotate_deg``; scale within ``1 +- scale``; HU noise and intensity jitter; never a left-right flip, which
would swap the arteries);
batching. Each process takes every ``process_count``-th element, so hosts read disjoint data. Every random
choice is a function of (seed, element index), so the stream is deterministic and its iterator state
(a position) checkpoints with ``grain.checkpoint``.

Evaluation (``iter_scans``): whole scans in slice order, one at a time (memory stays bounded).

Batches: ``images`` float32 ``(B, H, W, C)`` HU (the model applies the window), ``labels`` int32
``(B, H, W)``.
"""

from __future__ import annotations

import dataclasses
import os

import grain
import numpy as np
from scipy import ndimage

from calcjax.core import agatston
from calcjax.core import config as config_schema
from calcjax.core.hu import AIR_HU
from calcjax.io import pixel_size, records, shards

CALCIUM_HU = agatston.CALCIUM_THRESHOLD_HU  # voxels below it are never calcium, whatever the label says
# Adipose tissue on unenhanced CT (docs/background.md; data_prep.phantom.realism's band).
FAT_HU = (-190.0, -30.0)
SOFT_TISSUE_SHIFT_HU = (100.0, 150.0)  # fat (about -100 HU) to soft tissue (0..50 HU): lesion_soft_tissue_mm


ShardSplit = shards.Split  # one split of a shard folder (``calcjax.io.shards``: the folder's one home)


# The data block's keys that are not augmentation: read by the trainers (calcjax.core.config checks them).
DATA_KEYS = (
    "sources",
    "shards",
    "calcium_fraction",
    "seed",
    "worker_count",
    "real_val_shards",
    "real_val_split",
    "qrm_val_dicom",
)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Crop size and augmentation magnitudes (``augment``); the values live in the config's ``data`` block.

    crop: pixels (square). rotate_deg: the largest in-plane rotation (degrees, uniform +-). scale: the
    largest relative zoom (uniform 1 +- scale). noise_sd_hu: Gaussian noise SD (HU, drawn per crop up to
    this). jitter: the largest HU scale change (uniform 1 +- jitter). calcium_crop_probability: the share
    of crops centred on calcium where the slice has some. bright_crop_probability: of the crops not centred
    on calcium, the share centred on a bright (>= 130 HU) unlabelled object (picked uniformly over
    connected objects, so a rib or a valve nodule counts as much as the spine): hard negatives, the
    confounders (aortic wall and valve, mitral annulus, cartilage) a scorer must reject. Uniform crops alone
    rarely contain them and a model trained so calls them calcium.

    Randomisation against the phantom's tells (0 turns each off and draws nothing, so a config
    without them gives the stream it always gave): blur_px: in-plane Gaussian blur of the crop, sigma
    uniform in [0, blur_px] pixels (reconstruction kernels differ); hu_offset: a constant added to the crop,
    uniform +-hu_offset HU (scanner calibration); noise_correlation_px: the added noise is smoothed with a
    sigma uniform in [0, noise_correlation_px] pixels and rescaled to its drawn SD (kernel-shaped texture
    instead of white noise). label_grow_px: the labels follow the calcium threshold of the crop the
    network sees (``agatston.grow_to_threshold``): each grows up to this many pixels in-plane into adjacent
    voxels of the centre slice at >= 130 HU, and loses those below 130 HU; 0 keeps the reference's labels
    as warped (no draw either way). Blur, offset and noise move the 130 HU edge of a lesion away from its
    label's, so a network trained on the labels alone may learn a footprint smaller than the threshold's,
    where a real reference (an annotated lesion's voxels >= 130 HU) holds the whole footprint (measured:
    growing the shipped model's real predictions into the >= 130 HU voxels around them took real voxel
    recall from 0.26 to 0.46 at 4 pixels; training with label_grow_px=6, run J in docs/experiments/,
    left real recall where it was, so that mismatch is not the cause).

    lesion_soft_tissue_mm / lesion_soft_tissue_probability: with that probability, a crop with calcium
    on its centre slice gets the fat (-190..-30 HU) within a radius uniform in [0, lesion_soft_tissue_mm]
    mm of that slice's calcium label raised to soft tissue on every channel (+100..+150 HU, one draw per
    crop; a one-pixel ramp at the radius), before jitter, blur and noise, labels unchanged
    (:func:`soften_fat_around_calcium`). A phantom plaque sits in a fat groove; a real one in the soft
    tissue of its vessel wall, non-calcified plaque and the myocardium, atria and aortic root beside it
    (real gated lesions: 59% soft tissue 2-4 mm from their edge, v3 phantoms 4%), and the shipped model
    calls a bright spot ringed by 6 mm of soft tissue background on phantoms as on real scans
    (docs/experiments/). 0 mm turns it off and draws nothing. lesion_soft_tissue_bright: 1
    seeds the same change at every >= 130 HU pixel of the centre slice, calcium and unlabelled bright
    objects (confounders, bone, noise specks) alike, in any crop that has one, so that what a bright spot
    sits in tells nothing about its label; 0 seeds it at the calcium label only (run L in
    docs/experiments/, seeded so, made more real false positives, mostly bright specks in soft tissue;
    run M, seeded at every bright pixel, fewer).
    """

    crop: int
    rotate_deg: float
    scale: float
    noise_sd_hu: float
    jitter: float
    calcium_crop_probability: float
    bright_crop_probability: float
    blur_px: float
    hu_offset: float
    noise_correlation_px: float
    label_grow_px: int
    lesion_soft_tissue_mm: float
    lesion_soft_tissue_probability: float
    lesion_soft_tissue_bright: int

    @classmethod
    def from_config(cls, data_cfg) -> AugmentConfig:
        """From the config's ``data`` block: every field must be there; other keys only ``DATA_KEYS``."""
        return cls(**config_schema.fields_of(cls, data_cfg, "data", also=DATA_KEYS))


class PickRecord(grain.transforms.RandomMap):
    """Slot -> record index: calcium slots draw from the calcium records, the others from the rest."""

    def __init__(self, num_records: int, calcium: np.ndarray, num_calcium_slots: int):
        self.calcium = calcium
        mask = np.ones(num_records, bool)
        mask[calcium] = False
        self.others = np.flatnonzero(mask)
        self.num_calcium_slots = num_calcium_slots

    def random_map(self, slot, rng: np.random.Generator):
        pool = self.calcium if (slot < self.num_calcium_slots and self.calcium.size) else self.others
        if pool.size == 0:
            pool = self.calcium
        return int(pool[rng.integers(0, pool.size)])


class ReadRecord(grain.transforms.Map):
    """Record index -> decoded record (reads through grain's ArrayRecordDataSource)."""

    def __init__(self, paths):
        self.source = grain.sources.ArrayRecordDataSource(list(paths))

    def map(self, index):
        rec = records.decode(self.source[index])
        if rec["label"] is None:
            raise ValueError(f"record {index} of {self.source} has no label: training needs labelled scans")
        return rec


class Augment(grain.transforms.RandomMap):
    """Decoded record -> (crop x crop x C image, crop x crop label) with anatomy-keeping augmentation."""

    def __init__(self, cfg: AugmentConfig, pixel_mm: float = 0.0):
        """``pixel_mm``: the model's input pixel size (``model.pixel_mm``; 0 = native pixels)."""
        self.cfg = cfg
        self.pixel_mm = pixel_mm

    def random_map(self, rec, rng: np.random.Generator):
        to_mm = pixel_size.crop_zoom(rec["spacing"][1:], self.pixel_mm)
        crop_pixel_mm = self.pixel_mm or float(np.mean(rec["spacing"][1:]))
        return augment(rec["image"], rec["label"], self.cfg, rng, to_mm, crop_pixel_mm)


def bright_objects(hu: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected (8-neighbour) objects of ``hu >= 130`` outside the calcium label in one ``(H, W)`` slice:
    an int32 object-id map (0 none) and the number of objects."""
    return ndimage.label((hu >= CALCIUM_HU) & (label == 0), structure=np.ones((3, 3)))


def augment(
    image_chw,
    label,
    cfg: AugmentConfig,
    rng: np.random.Generator,
    to_mm: float = 1.0,
    crop_pixel_mm: float | None = None,
) -> dict:
    """Crop (biased to calcium, else to bright objects), rotation / scale about the crop centre, HU noise
    and jitter (module doc; :class:`AugmentConfig`). ``to_mm``: zoom that makes one crop pixel the model's
    pixel size (``pixel_size.crop_zoom``; 1 = native pixels); the crop then covers ``crop / to_mm`` record
    pixels. ``crop_pixel_mm``: one crop pixel in mm, needed by ``lesion_soft_tissue_mm``."""
    c, h, w = image_chw.shape
    s = cfg.crop
    ys, xs = np.nonzero(label)
    if not (ys.size and rng.uniform() < cfg.calcium_crop_probability):
        ys = xs = np.zeros(0, np.int64)
        if cfg.bright_crop_probability > 0 and rng.uniform() < cfg.bright_crop_probability:
            objects, n = bright_objects(image_chw[c // 2], label)
            if n:
                ys, xs = np.nonzero(objects == rng.integers(1, n + 1))
    if ys.size:
        i = rng.integers(0, ys.size)
        cy = ys[i] + rng.uniform(-0.3, 0.3) * (s / to_mm)  # record pixels
        cx = xs[i] + rng.uniform(-0.3, 0.3) * (s / to_mm)
    else:
        half = s / (2 * to_mm)  # the crop's half-width in record pixels
        cy, cx = rng.uniform(half, max(h - half, half)), rng.uniform(half, max(w - half, half))
    angle = np.radians(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg))
    zoom = (1.0 + rng.uniform(-cfg.scale, cfg.scale)) * to_mm
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) / zoom
    grid = np.stack(np.meshgrid(np.arange(s) - (s - 1) / 2, np.arange(s) - (s - 1) / 2, indexing="ij"))
    coords = np.einsum("ij,jyx->iyx", rot, grid) + np.array([cy, cx])[:, None, None]
    out = np.empty((s, s, c), np.float32)
    for ch in range(c):
        out[..., ch] = ndimage.map_coordinates(image_chw[ch].astype(np.float32), coords, order=1, cval=AIR_HU)
    lab = ndimage.map_coordinates(label, coords, order=0, cval=0).astype(np.int32)
    if cfg.lesion_soft_tissue_mm > 0:
        seeds = (lab > 0) | (out[..., c // 2] >= CALCIUM_HU) if cfg.lesion_soft_tissue_bright else lab > 0
        if seeds.any() and rng.uniform() < cfg.lesion_soft_tissue_probability:
            if not crop_pixel_mm:
                raise ValueError("data.lesion_soft_tissue_mm needs the crop's pixel size (crop_pixel_mm)")
            radius_px = rng.uniform(0.0, cfg.lesion_soft_tissue_mm) / crop_pixel_mm
            out = soften_fat_around_calcium(out, seeds, radius_px, rng.uniform(*SOFT_TISSUE_SHIFT_HU))
    out = (out - AIR_HU) * np.float32(1.0 + rng.uniform(-cfg.jitter, cfg.jitter)) + AIR_HU
    if cfg.blur_px > 0:
        sigma = rng.uniform(0.0, cfg.blur_px)
        out = ndimage.gaussian_filter(out, sigma=(sigma, sigma, 0.0), mode="nearest")
    if cfg.hu_offset > 0:
        out += np.float32(rng.uniform(-cfg.hu_offset, cfg.hu_offset))
    sd = rng.uniform(0.0, cfg.noise_sd_hu)
    if cfg.noise_correlation_px > 0:
        out += correlated_noise(out.shape, sd, rng.uniform(0.0, cfg.noise_correlation_px), rng)
    else:
        out += rng.normal(0.0, sd, size=out.shape).astype(np.float32)
    if cfg.label_grow_px > 0:
        lab = agatston.grow_to_threshold(lab, out[..., c // 2], cfg.label_grow_px)
    return {"images": out, "labels": lab}


def soften_fat_around_calcium(
    image_hwc: np.ndarray, label_hw: np.ndarray, radius_px: float, shift_hu: float
) -> np.ndarray:
    """``image_hwc`` (HU, float32 ``(H, W, C)``) with its fat voxels (``FAT_HU``) within ``radius_px``
    in-plane pixels of ``label_hw > 0`` (the calcium label, or any seed mask) raised by ``shift_hu`` on
    every channel; the weight falls from 1 at ``radius_px`` to 0 one pixel further (partial volume).
    Fat only: lung, soft tissue, bone and the calcium itself keep their HU, and so does the noise around
    the shifted mean."""
    dist = ndimage.distance_transform_edt(label_hw == 0)  # pixels to the nearest labelled pixel
    weight = np.clip(radius_px + 1.0 - dist, 0.0, 1.0).astype(np.float32)
    fat = (image_hwc >= FAT_HU[0]) & (image_hwc < FAT_HU[1])
    return image_hwc + np.float32(shift_hu) * weight[..., None] * fat


def correlated_noise(shape_hwc, sd: float, sigma_px: float, rng: np.random.Generator) -> np.ndarray:
    """float32 noise of ``shape_hwc`` with standard deviation ``sd`` (HU), smoothed in-plane by a Gaussian
    of ``sigma_px`` pixels (each channel its own field)."""
    n = rng.normal(0.0, 1.0, size=shape_hwc)
    if sigma_px > 0:
        n = ndimage.gaussian_filter(n, sigma=(sigma_px, sigma_px, 0.0), mode="wrap")
        n /= max(float(n.std()), 1e-6)
    return (n * sd).astype(np.float32)


class TagSource(grain.transforms.Map):
    """Adds ``source``: the index of the training source an example came from (``calcjax.data.sources``)."""

    def __init__(self, index: int):
        self.index = index

    def map(self, example):
        return {**example, "source": np.int32(self.index)}


def _source_stream(
    split: ShardSplit, index: int, aug: AugmentConfig, calcium_fraction: float, seed: int, num_epochs: int,
    pixel_mm: float,
) -> grain.MapDataset:  # fmt: skip
    """One source's shuffled, augmented examples (seeds offset per source, so sources draw apart)."""
    n = split.num_records
    n_cal = int(round(calcium_fraction * n)) if split.calcium_records.size else 0
    seed = seed + 1000 * index
    ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat(num_epochs)
    ds = ds.random_map(PickRecord(n, split.calcium_records, n_cal), seed=seed + 1)
    ds = ds.map(ReadRecord(split.paths))
    ds = ds.random_map(Augment(aug, pixel_mm), seed=seed + 2)
    return ds.map(TagSource(index))


def train_dataset(
    sources: ShardSplit | list[tuple[ShardSplit, float]],
    *,
    batch_size: int,
    aug: AugmentConfig,
    calcium_fraction: float,
    seed: int,
    num_epochs: int = 1000,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
    pixel_mm: float = 0.0,
) -> grain.IterDataset:
    """The training stream of this process: ``batch_size`` local examples per batch (see module doc) of
    ``images``, ``labels`` and ``source`` (the index of the source each came from). ``sources``: one split,
    or ``(split, weight)`` pairs mixed in the weights' proportions (``grain.MapDataset.mix``); ``pixel_mm``:
    the model's input pixel size (0 = native pixels)."""
    pairs = [(sources, 1.0)] if isinstance(sources, ShardSplit) else list(sources)
    streams = [
        _source_stream(split, k, aug, calcium_fraction, seed, num_epochs, pixel_mm)
        for k, (split, _) in enumerate(pairs)
    ]
    ds = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, [w for _, w in pairs])
    ds = ds[process_index::process_count]
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2 * batch_size))
    it = it.batch(batch_size, drop_remainder=True)
    if worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it


def iter_scans(split: ShardSplit, *, process_index: int = 0, process_count: int = 1):
    """Yields this process's scans in manifest order, each whole and in slice order.

    Each item: ``scan`` (:class:`calcjax.io.shards.ScanEntry`), ``hu`` int16 ``(Z, H, W)`` centre slices
    (a forward pass builds the 2.5D stacks from them, ``calcjax.io.preprocess.slice_stacks``), ``labels``
    uint8 ``(Z, H, W)`` or None. A record that cannot be read raises
    :class:`calcjax.io.records.RecordError` naming the shard and the scan (``calcjax.io.shards.read_scan``).
    """
    with shards.Readers() as readers:
        for i, scan in enumerate(split.scans):
            if i % process_count != process_index:
                continue
            reader = readers.get(os.path.join(split.folder, scan.shard))
            hu, labels = shards.read_scan(reader, scan, split.context)
            yield {"scan": scan, "hu": hu, "labels": labels}
