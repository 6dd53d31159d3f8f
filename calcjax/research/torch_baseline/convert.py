"""Weight conversion between the Flax NNX DenseRAUnet and its PyTorch twin (both directions, ``.pt`` files).

Names: the NNX state path joined by dots is the PyTorch parameter name, with ``kernel`` -> ``weight``
(conv kernels HWIO -> OIHW) and, in BatchNorm, ``scale`` -> ``weight``, ``mean`` -> ``running_mean``,
``var`` -> ``running_var``. PyTorch's ``num_batches_tracked`` has no JAX twin (set to 0 on export).
"""

from __future__ import annotations

import collections

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _torch_name(path: tuple) -> tuple[str, bool]:
    *prefix, leaf = (str(p) for p in path)
    is_bn = leaf in ("scale", "mean", "var") or (
        leaf == "bias" and prefix and prefix[-1] in ("bn", "head_bn")
    )
    if is_bn:
        name = _BN[leaf]
    else:
        name = "weight" if leaf == "kernel" else leaf
    return ".".join([*prefix, name]), leaf == "kernel"


def jax_to_torch(model: nnx.Module) -> collections.OrderedDict:
    """The PyTorch ``state_dict`` of an NNX DenseRAUnet (float32 tensors)."""
    out = collections.OrderedDict()
    for path, var in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat))):
        name, is_kernel = _torch_name(path)
        a = np.asarray(var.get_value(), dtype=np.float32)
        if is_kernel:
            a = a.transpose(3, 2, 0, 1)
        out[name] = torch.from_numpy(np.array(a, dtype=np.float32, copy=True))
        if name.endswith("running_var"):
            out[name[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return out


def torch_to_jax(state_dict, model: nnx.Module) -> None:
    """Loads a PyTorch ``state_dict`` into an NNX DenseRAUnet of the same config, in place."""
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    flat = nnx.to_flat_state(state)
    missing = []
    for path, var in flat:
        name, is_kernel = _torch_name(path)
        if name not in state_dict:
            missing.append(name)
            continue
        a = state_dict[name].detach().cpu().numpy().astype(np.float32)
        if is_kernel:
            a = a.transpose(2, 3, 1, 0)
        if a.shape != var.get_value().shape:
            raise ValueError(f"{name}: shape {a.shape} does not fit {var.get_value().shape}")
        var.set_value(jnp.asarray(a))
    if missing:
        raise KeyError(f"state_dict lacks {len(missing)} weights, e.g. {missing[:3]}")
    nnx.update(model, nnx.from_flat_state(flat))


def save_pt(model: nnx.Module, path: str) -> None:
    """Writes the model's weights as a PyTorch ``.pt`` state_dict."""
    torch.save(jax_to_torch(model), path)


def load_pt(path: str, model: nnx.Module) -> None:
    """Reads a PyTorch ``.pt`` state_dict into the NNX model, in place."""
    torch_to_jax(torch.load(path, map_location="cpu", weights_only=True), model)
