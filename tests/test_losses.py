"""calcjax.losses against a direct numpy computation on hand-checkable inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calcjax import losses


def numpy_loss(logits, labels, rho, k_min, lam, smooth=1.0):
    """The definition, written directly: sort each image's pixel CE, average the k largest; IoU by sums."""
    b, h, w, k = logits.shape
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    ce = -np.take_along_axis(logp, labels[..., None], axis=-1)[..., 0].reshape(b, -1)
    n = min(h * w, max(k_min, int(np.ceil(rho * h * w))))
    bce = np.mean([np.sort(row)[::-1][:n].mean() for row in ce])
    p = np.exp(logp)
    ious = []
    for c in range(1, k):
        y = (labels == c).astype(np.float64)
        inter = (p[..., c] * y).sum()
        union = (p[..., c] + y - p[..., c] * y).sum()
        ious.append((inter + smooth) / (union + smooth))
    return bce + lam * (1 - np.mean(ious)), bce, np.array(ious)


def test_matches_numpy_on_random_inputs():
    rng = np.random.default_rng(0)
    for rho, k_min in ((0.1, 4), (0.5, 1), (1.0, 1), (0.01, 20)):
        logits = rng.normal(size=(3, 8, 6, 5)).astype(np.float32) * 3
        labels = rng.integers(0, 5, size=(3, 8, 6))
        got = float(
            losses.bootstrap_iou_loss(jnp.asarray(logits), jnp.asarray(labels), rho=rho, k_min=k_min, lam=0.7)
        )
        want, _, _ = numpy_loss(logits.astype(np.float64), labels, rho, k_min, 0.7)
        assert got == pytest.approx(want, rel=1e-5)


def test_hand_computed_bootstrap_with_ties_at_the_boundary():
    # One 2x2 image, two classes. CE per pixel: pixel logits (0, 0) -> ln 2 for any label; (big, 0) -> ~0.
    logits = np.zeros((1, 2, 2, 2), np.float32)
    logits[0, 1, 1] = (30.0, 0.0)  # confident background
    labels = np.array([[[1, 0], [1, 0]]])
    # CE = [ln2, ln2, ln2, ~0]; rho = 0.5 -> k = 2 of three tied ln2 values: the mean is ln2 either way.
    bce = float(losses.bootstrapped_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), rho=0.5, k_min=1))
    assert bce == pytest.approx(np.log(2.0), rel=1e-6)
    assert (
        losses.num_hardest(4, 0.5, 1) == 2
        and losses.num_hardest(4, 0.1, 3) == 3
        and losses.num_hardest(4, 0.1, 9) == 4
    )
    # k_min wins over rho: k = 4 -> mean of three ln2 and one ~0.
    bce4 = float(
        losses.bootstrapped_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), rho=0.1, k_min=4)
    )
    assert bce4 == pytest.approx(3 * np.log(2.0) / 4, rel=1e-5)
    # Soft IoU of class 1: p = 0.5 on three pixels, ~0 on one; y = 1 on two pixels.
    iou = float(losses.soft_iou(jnp.asarray(logits), jnp.asarray(labels), smooth=1.0)[0])
    inter, union = 0.5 + 0.5, (0.5 + 1 - 0.5) * 2 + 0.5 + 0.0
    assert iou == pytest.approx((inter + 1) / (union + 1), rel=1e-5)


def test_all_background_is_finite_and_jittable():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16, 16, 5)), jnp.float32)
    labels = jnp.zeros((2, 16, 16), jnp.int32)
    f = jax.jit(lambda lg, lb: losses.bootstrap_iou_loss(lg, lb, rho=0.1, k_min=8, lam=1.0))
    value = f(logits, labels)
    grad = jax.grad(lambda lg: f(lg, labels))(logits)
    assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all()
    want, _, ious = numpy_loss(np.asarray(logits, np.float64), np.asarray(labels), 0.1, 8, 1.0)
    assert float(value) == pytest.approx(want, rel=1e-5) and (ious > 0).all()
    # A confident all-background prediction on an all-background batch: IoU terms ~1, loss ~0.
    sure = jnp.zeros((2, 16, 16, 5)).at[..., 0].set(40.0)
    assert float(f(sure, labels)) == pytest.approx(0.0, abs=1e-3)
