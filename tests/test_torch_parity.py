"""The PyTorch twin: identical weights give identical logits, losses and gradients (float32)."""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from xla_env import at_fast_compile, xla_flags

torch = pytest.importorskip("torch")

from flax import nnx  # noqa: E402

from calcjax.model import cpu_kernels, losses  # noqa: E402
from calcjax.model.network import ModelConfig, new_model  # noqa: E402
from calcjax.research.torch_baseline import convert  # noqa: E402
from calcjax.research.torch_baseline import losses as torch_losses  # noqa: E402
from calcjax.research.torch_baseline import model as torch_model  # noqa: E402
from configs import default, smoke  # noqa: E402
from data_prep.phantom.generator import generate_scan  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS = dict(rho=0.1, k_min=16, lam=1.0)
torch.set_num_threads(2)


@nnx.jit
def forward(m, x):
    return m(x)


def model_config(name):
    cfg = {"smoke": smoke, "default": default}[name].get_config().model
    cfg.dtype = "float32"
    return ModelConfig.from_config(cfg)


@functools.cache
def phantom(size):
    return generate_scan(0, 4, "cardiac", size=size, target_category=4)


def ct_batch(batch, size):
    """Real CT-like inputs: 3-slice stacks of a phantom scan (calcium slices first) and their labels."""
    scan = phantom(size)
    with_calcium = np.flatnonzero(scan.label.any(axis=(1, 2)))
    picks = ([int(k) for k in with_calcium] + list(range(1, scan.hu.shape[0] - 1, 7)))[:batch]
    x = np.stack([np.moveaxis(scan.hu[[k - 1, k, k + 1]], 0, -1) for k in picks]).astype(np.float32)
    return x, np.stack([scan.label[k] for k in picks]).astype(np.int64)


def twins(name, seed=0):
    """A JAX model with calibrated BatchNorm statistics and its PyTorch twin with converted weights."""
    cfg = model_config(name)
    jm = new_model(cfg, seed)
    jm.train()
    x, _ = ct_batch(4, 64)
    for _ in range(10):  # move the running statistics near the data's, so eval mode is meaningful
        forward(jm, jnp.asarray(x))
    tm = torch_model.DenseRAUnet(cfg)
    tm.load_state_dict(convert.jax_to_torch(jm), strict=True)
    return cfg, jm, tm


def run_both(jm, tm, x, train):
    jm.train() if train else jm.eval()
    tm.train(train)
    yj = np.asarray(forward(jm, jnp.asarray(x)))
    with torch.no_grad():
        yt = tm(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    return yj, yt


@pytest.mark.parametrize("name", ["smoke", "default"])
@pytest.mark.parametrize("shape", [(2, 64, 64, 3), (1, 256, 256, 3)])
def test_logits_agree_in_eval_and_train_mode(name, shape):
    _, jm, tm = twins(name)
    x, _ = ct_batch(shape[0], shape[1])
    for train in (False, True):
        yj, yt = run_both(jm, tm, x, train)
        assert np.abs(yj - yt).max() <= 1e-4, (train, np.abs(yj - yt).max())


# Inputs are CT (phantom slices), not noise: on white noise the BatchNorm-parameter gradients of the default
# model are so ill-conditioned that float32 PyTorch itself is 6e-3 from a float64 reference. The
# bootstrapped CE keeps the k hardest pixels; where float32 rounding (1e-5) swaps two pixels at the k-th
# place, the gradient moves by those pixels' share, so rho = 1 (every pixel) checks the rest of the chain
# of the deeper model, and rho = 0.1 is checked where the selection is stable in both frameworks. The
# default model runs at 128x128: at 64x64 its bottleneck BatchNorm sees 2x4x4 values per channel and its
# bias gradient (a sum that nearly cancels) differs by 1.8e-3 between the float32 frameworks. Even at 128x128
# many of the default model's gradients differ by more than 1e-3, where float32 PyTorch is itself that far
# from its float64 result: for the default model a parameter beyond 1e-3 passes when JAX is within 3x
# PyTorch's own float32 error (and that error is above 2e-4); the smoke model meets 1e-3 everywhere.
@pytest.mark.parametrize(
    ("name", "size", "rho"), [("smoke", 64, 0.1), ("smoke", 64, 1.0), ("default", 128, 1.0)]
)
def test_loss_and_every_gradient_agree(name, size, rho, request):
    if name == "default" and at_fast_compile():
        # The 3x tolerance below was measured at the level users compile at; at the test run's fast-compile
        # level one BatchNorm gradient of the default model is 3.7x: this case runs itself at users' level.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
        env["XLA_FLAGS"] = xla_flags(users_level=True)
        args = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:xdist",
            "-p",
            "no:cacheprovider",
            request.node.nodeid,
        ]
        p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
        assert p.returncode == 0, p.stdout[-3000:]
        return
    cfg, jm, tm = twins(name)
    x, labels = ct_batch(2, size)
    loss_args = {**LOSS, "rho": rho}
    jm.train()
    tm.train()

    def loss_fn(m):
        return losses.bootstrap_iou_loss(m(jnp.asarray(x)), jnp.asarray(labels), **loss_args)

    # On XLA's kernels: with rho = 1 this input lies within float32 rounding of a ReLU's kink (the
    # float64 gradient moves by 5e-3 when the input moves by 1e-6), so the side a float32 run lands on
    # depends on each convolution's order of summation; with oneDNN's (calcjax.model.conv, JAX's default
    # on a CPU) the smoke model's gradients are 5e-3 from PyTorch's and 8.8e-6 at rho = 0.1. The two
    # routes' gradients are compared where the loss is smooth in test_onednn.py, the native BatchNorm's
    # against float64 in test_batchnorm.py; the logits above run on the default route.
    with cpu_kernels.xla_kernels():
        lj, grads = nnx.jit(nnx.value_and_grad(loss_fn))(jm)
    lt = torch_losses.bootstrap_iou_loss(
        tm(torch.from_numpy(x).permute(0, 3, 1, 2)), torch.from_numpy(labels), **loss_args
    )
    lt.backward()
    assert float(lj) == pytest.approx(lt.item(), rel=1e-5)
    tgrads = {n: p.grad.numpy() for n, p in tm.named_parameters()}
    # PyTorch in float64 as the exact reference: its float32 distance to it is the float32 noise floor.
    t64 = copy.deepcopy(tm).double()
    torch_losses.bootstrap_iou_loss(
        t64(torch.from_numpy(x).double().permute(0, 3, 1, 2)), torch.from_numpy(labels), **loss_args
    ).backward()
    exact = {n: p.grad.numpy() for n, p in t64.named_parameters()}
    checked, worst, at_floor = 0, 0.0, []
    for path, g in nnx.to_flat_state(grads):
        name_t, is_kernel = convert._torch_name(path)
        gj = np.asarray(g.get_value())
        if is_kernel:
            gj = gj.transpose(3, 2, 0, 1)
        gt = tgrads[name_t]
        rel = np.linalg.norm(gj - gt) / max(np.linalg.norm(gt), 1e-12)
        floor = np.linalg.norm(gt - exact[name_t]) / max(np.linalg.norm(exact[name_t]), 1e-30)
        worst = max(worst, rel)
        if rel > 1e-3:
            at_floor.append(name_t)
            # Only where float32 PyTorch itself is that far from exact, and JAX no farther than 3x that.
            jax_err = np.linalg.norm(gj - exact[name_t]) / np.linalg.norm(exact[name_t])
            assert floor > 2e-4 and jax_err <= 3 * floor, (name_t, rel, floor, jax_err)
        checked += 1
    assert checked == len(tgrads)
    if name == "smoke":
        assert not at_floor
    print(
        f"{name} {size} rho={rho}: worst relative gradient difference {worst:.2e}; "
        f"{len(at_floor)} of {checked} "
        "parameters beyond 1e-3, each within 3x float32 PyTorch's own distance to float64"
    )


def test_round_trip_jax_torch_jax_is_identical(tmp_path):
    cfg, jm, _ = twins("smoke")
    path = tmp_path / "w.pt"
    convert.save_pt(jm, str(path))
    other = new_model(cfg, 99)
    convert.load_pt(str(path), other)
    a = nnx.to_flat_state(nnx.state(jm, (nnx.Param, nnx.BatchStat)))
    b = dict(nnx.to_flat_state(nnx.state(other, (nnx.Param, nnx.BatchStat))))
    for p, v in a:
        np.testing.assert_array_equal(np.asarray(v.get_value()), np.asarray(b[p].get_value()))
    # torch -> jax -> torch as well.
    tm = torch_model.DenseRAUnet(cfg)
    fresh = new_model(cfg, 5)
    convert.torch_to_jax(tm.state_dict(), fresh)
    back = convert.jax_to_torch(fresh)
    for k, v in tm.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(back[k], v, rtol=0, atol=0)


def test_bad_input_sizes_are_refused():
    _, jm, tm = twins("smoke")
    with pytest.raises(ValueError, match="multiple of 2\\^depth = 8"):
        jm(jnp.zeros((1, 60, 64, 3)))
    with pytest.raises(ValueError, match="multiple"):
        tm(torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match="channels"):
        jm(jnp.zeros((1, 64, 64, 5)))
    assert jax.tree.leaves(nnx.state(jm, nnx.Param))


@pytest.mark.parametrize("iou_classes", ["present", "all"])
def test_loss_twins_agree_with_an_absent_class(iou_classes):
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(2, 12, 10, 5)).astype(np.float32) * 2
    labels = rng.integers(0, 3, size=(2, 12, 10))  # classes 3 and 4 absent
    args = dict(rho=0.2, k_min=8, lam=0.8, iou_classes=iou_classes)
    lj = losses.bootstrap_iou_loss(jnp.asarray(logits), jnp.asarray(labels), **args)
    lt = torch_losses.bootstrap_iou_loss(
        torch.from_numpy(logits).permute(0, 3, 1, 2), torch.from_numpy(labels), **args
    )
    assert float(lj) == pytest.approx(lt.item(), rel=1e-5)
