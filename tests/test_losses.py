"""calcjax.model.losses against a direct numpy computation on hand-checkable inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calcjax.model import losses


def numpy_loss(logits, labels, rho, k_min, lam, smooth=1.0, iou_classes="present"):
    """The definition, written directly: sort each image's pixel CE, average the k largest; IoU by sums;
    ``1 - IoU`` averaged over the classes in the labels ("present") or over all foreground classes."""
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
    ious = np.array(ious)
    used = np.ones(k - 1, bool) if iou_classes == "all" else np.isin(np.arange(1, k), labels)
    gap = (1 - ious[used]).mean() if used.any() else 0.0
    return bce + lam * gap, bce, ious


@pytest.mark.parametrize("iou_classes", ["present", "all"])
def test_matches_numpy_on_random_inputs(iou_classes):
    rng = np.random.default_rng(0)
    for rho, k_min, num_labels in ((0.1, 4, 5), (0.5, 1, 5), (1.0, 1, 3), (0.01, 20, 2)):
        logits = rng.normal(size=(3, 8, 6, 5)).astype(np.float32) * 3
        labels = rng.integers(0, num_labels, size=(3, 8, 6))  # num_labels < 5: classes absent
        got = float(
            losses.bootstrap_iou_loss(
                jnp.asarray(logits),
                jnp.asarray(labels),
                rho=rho,
                k_min=k_min,
                lam=0.7,
                iou_classes=iou_classes,
            )
        )
        want, _, _ = numpy_loss(logits.astype(np.float64), labels, rho, k_min, 0.7, iou_classes=iou_classes)
        assert got == pytest.approx(want, rel=1e-5)


def test_present_classes_only_an_absent_class_adds_nothing():
    # Class 4 absent from the labels: with "present", probability put on it changes only the CE part.
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, size=(2, 8, 8))
    logits = rng.normal(size=(2, 8, 8, 5)).astype(np.float32)
    bumped = logits.copy()
    bumped[..., 4] += 2.0
    for lg in (jnp.asarray(logits), jnp.asarray(bumped)):
        lb = jnp.asarray(labels)
        full = float(losses.bootstrap_iou_loss(lg, lb, rho=1.0, k_min=1, lam=1.0))
        bce = float(losses.bootstrapped_cross_entropy(lg, lb, rho=1.0, k_min=1))
        ious = np.asarray(losses.soft_iou(lg, lb))
        assert full == pytest.approx(bce + np.mean(1 - ious[:3]), rel=1e-5)
    # ...whereas "all" charges the absent class: its IoU 1 / (sum p_4 + 1) falls as p_4 grows.
    all_iou = [
        float(losses.iou_term(jnp.asarray(lg), jnp.asarray(labels), classes="all")) for lg in (logits, bumped)
    ]
    assert all_iou[1] > all_iou[0]
    with pytest.raises(ValueError, match="iou_classes"):
        losses.iou_term(jnp.asarray(logits), jnp.asarray(labels), classes="some")


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
    want, bce, ious = numpy_loss(np.asarray(logits, np.float64), np.asarray(labels), 0.1, 8, 1.0)
    assert float(value) == pytest.approx(want, rel=1e-5) and (ious > 0).all()
    assert want == bce  # no foreground class present: the IoU term is 0
    # A confident all-background prediction on an all-background batch: loss ~0 either way.
    sure = jnp.zeros((2, 16, 16, 5)).at[..., 0].set(40.0)
    assert float(f(sure, labels)) == pytest.approx(0.0, abs=1e-3)
    f_all = jax.jit(
        lambda lg, lb: losses.bootstrap_iou_loss(lg, lb, rho=0.1, k_min=8, lam=1.0, iou_classes="all")
    )
    assert float(f_all(sure, labels)) == pytest.approx(0.0, abs=1e-3)
    assert np.isfinite(np.asarray(jax.grad(lambda lg: f_all(lg, labels))(logits))).all()
