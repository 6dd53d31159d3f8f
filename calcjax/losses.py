"""The bootstrap-IoU loss of DenseRAUnet (pure jnp, jit-able, no host sync).

``loss = bootstrapped CE + lam * (1 - mean soft IoU of the foreground classes)``:

- bootstrapped cross-entropy (Wu, Shen & van den Hengel 2016, "bootstrapping"): per image, the mean
  pixel cross-entropy over its ``k = min(H*W, max(k_min, ceil(rho * H*W)))`` hardest pixels (largest CE),
  then the mean over the batch. Which of several tied pixels at the k-th place is taken does not change the
  value (their CE is equal). ``k`` is static, from the shapes.
- soft IoU per foreground class c = 1..K-1 over the whole batch:
  ``(sum p_c y_c + s) / (sum (p_c + y_c - p_c y_c) + s)`` with softmax probabilities ``p``, one-hot labels
  ``y`` and smoothing ``s = smooth`` (1 pixel), so an all-background batch gives a finite value (IoU near 1
  when nothing is predicted) and never NaN; the term is averaged over the K-1 classes.

Args everywhere: ``logits`` ``(B, H, W, K)`` float, ``labels`` ``(B, H, W)`` int in [0, K).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def num_hardest(num_pixels: int, rho: float, k_min: int) -> int:
    """k = min(H*W, max(k_min, ceil(rho * H*W))): pixels the bootstrapped CE averages per image."""
    return int(min(num_pixels, max(k_min, math.ceil(rho * num_pixels))))


def bootstrapped_cross_entropy(logits: jax.Array, labels: jax.Array, *, rho: float, k_min: int) -> jax.Array:
    """Mean over images of the mean CE of each image's k hardest pixels (see module docstring)."""
    b, h, w, _ = logits.shape
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    k = num_hardest(h * w, rho, k_min)
    hardest, _ = jax.lax.top_k(ce.reshape(b, h * w), k)
    return hardest.mean()


def soft_iou(logits: jax.Array, labels: jax.Array, *, smooth: float = 1.0) -> jax.Array:
    """``(K-1,)`` soft IoU of each foreground class over the batch (see module docstring)."""
    k = logits.shape[-1]
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1:]
    y = jax.nn.one_hot(labels, k, dtype=jnp.float32)[..., 1:]
    axes = tuple(range(p.ndim - 1))
    inter = (p * y).sum(axis=axes)
    union = (p + y - p * y).sum(axis=axes)
    return (inter + smooth) / (union + smooth)


def bootstrap_iou_loss(
    logits: jax.Array, labels: jax.Array, *, rho: float, k_min: int, lam: float, smooth: float = 1.0
) -> jax.Array:
    """Bootstrapped CE + lam * (1 - mean foreground soft IoU); a scalar float32."""
    bce = bootstrapped_cross_entropy(logits, labels, rho=rho, k_min=k_min)
    iou = soft_iou(logits, labels, smooth=smooth).mean()
    return bce + lam * (1.0 - iou)
