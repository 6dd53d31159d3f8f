"""DenseRAUnet in Flax NNX: a 2.5D U-Net of dense-residual blocks with an atrous bottleneck.

Our reading of Ma & Zhang (arXiv 1907.11392), whose code and hyper-parameters were never published; every
size is a config value (``configs/default.py``: the recipe at 512x512, C = 3 slices; ``configs/smoke.py``:
a small CPU model). Layout NHWC. Layers, in order:

- input grid: ``pixel_mm`` > 0 means the model sees slices resampled in-plane to pixels of that size (mm)
  in training and inference (``calcjax.io.pixel_size``); 0 means native pixels;
- input window (the only place it is applied): HU clipped to ``[hu_min, hu_max]`` and scaled linearly to
  [-1, 1]; default [-400, 1200] HU, which keeps the 130 HU calcium threshold and the 200/300/400 HU weight
  bands well resolved and saturates only above the highest Agatston band;
- stem: 3x3 conv, ``in_channels -> stem_features``;
- encoder level i (resolution H / 2^i): a dense-residual block to ``widths[i]``, kept as skip i, then a
  downsampling transition BN-ReLU-3x3 conv with stride 2;
- dense-residual block (in -> W): L layers, layer l = BN-ReLU-3x3 conv (growth g outputs) of the concatenation
  of the block input and every earlier layer's output; the L outputs are concatenated and fused by
  BN-ReLU-1x1 conv to W, plus a projected shortcut (1x1 conv of the block input);
- bottleneck (H / 2^depth): the same block with atrous 3x3 convs, layer l dilated by ``dilations[l]``;
- decoder level i (from deep to shallow): nearest-neighbour 2x upsampling, 3x3 conv to ``widths[i]``,
  concatenation with skip i, dense-residual block to ``widths[i]``;
- head: BN-ReLU-1x1 conv to ``num_classes`` logits (with bias).

Convolutions have no bias except the head; kernels start He-normal (the head LeCun-normal); padding is
explicit (``dilation`` on each side), so the PyTorch
twin (``calcjax.research.torch_baseline.model``) with the same weights gives the same outputs. BatchNorm:
momentum
0.9 (PyTorch 0.1), epsilon 1e-5; under ``jax.jit`` with the batch sharded on a mesh its statistics are
those of the global batch. Parameters are float32; ``dtype`` is the compute dtype (float32 or bfloat16).
H and W must be multiples of 2^depth.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from calcjax.core import compile_cache
from calcjax.core import config as config_schema
from calcjax.model import batchnorm, cpu_kernels
from calcjax.model import conv as conv_lib

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
_HE = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """DenseRAUnet sizes (module docstring); the values live in ``configs/*.py`` (``config.model``)."""

    num_classes: int
    in_channels: int
    stem_features: int
    widths: tuple[int, ...]
    block_layers: tuple[int, ...]
    growth_rate: int
    bottleneck_width: int
    bottleneck_growth: int
    dilations: tuple[int, ...]
    decoder_layers: tuple[int, ...]
    hu_min: float
    hu_max: float
    dtype: str
    pixel_mm: float

    @property
    def depth(self) -> int:
        return len(self.widths)

    @classmethod
    def from_config(cls, cfg) -> ModelConfig:
        """From a config's ``model`` block (``config_schema.fields_of``: every field, no other key)."""
        return cls(**config_schema.fields_of(cls, cfg, "model"))

    @classmethod
    def from_saved(cls, cfg) -> ModelConfig:
        """From the ``model`` block saved with a model file or checkpoint: one written before
        ``pixel_mm`` existed is a native-resolution model (``pixel_mm`` 0)."""
        block = dict(cfg)
        block.setdefault("pixel_mm", 0.0)
        return cls.from_config(block)


def _conv(cin, cout, k, rngs, dtype, *, stride=1, dilation=1, bias=False, kernel_init=_HE):
    pad = dilation * (k // 2)
    return nnx.Conv(
        cin,
        cout,
        (k, k),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        kernel_dilation=(dilation, dilation),
        use_bias=bias,
        kernel_init=kernel_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        conv_general_dilated=conv_lib.conv_general_dilated,
        rngs=rngs,
    )


def _bn(n, rngs, dtype):
    return nnx.BatchNorm(
        n,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        use_fast_variance=False,  # two-pass variance, as PyTorch computes it
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


class BnReluConv(nnx.Module):
    """BatchNorm -> ReLU -> conv (pre-activation); the input an array or pieces read as their concatenation
    along the channels."""

    def __init__(self, cin, cout, k, rngs, dtype, *, stride=1, dilation=1):
        self.bn = _bn(cin, rngs, dtype)
        self.conv = _conv(cin, cout, k, rngs, dtype, stride=stride, dilation=dilation)

    def __call__(self, x):
        return self.conv(batchnorm.bn_relu(self.bn, x))


class DenseResBlock(nnx.Module):
    """L densely connected BN-ReLU-3x3 conv layers, fused by BN-ReLU-1x1 conv, plus a projected shortcut."""

    def __init__(self, cin, cout, layers, growth, rngs, dtype, dilations=None):
        dilations = dilations or (1,) * layers
        self.layers = nnx.List(
            [
                BnReluConv(cin + i * growth, growth, 3, rngs, dtype, dilation=dilations[i])
                for i in range(layers)
            ]
        )
        self.fuse = BnReluConv(layers * growth, cout, 1, rngs, dtype)
        self.shortcut = _conv(cin, cout, 1, rngs, dtype)

    def __call__(self, x):
        feats, outs = [x], []
        for layer in self.layers:
            y = layer(feats)  # the concatenation of feats, read in place (calcjax.model.batchnorm)
            outs.append(y)
            feats = [*feats, y]
        return self.fuse(outs) + self.shortcut(x)


class DenseRAUnet(nnx.Module):
    """DenseRAUnet: ``(B, H, W, C)`` HU -> ``(B, H, W, num_classes)`` logits (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if not (len(cfg.widths) == len(cfg.block_layers) == len(cfg.decoder_layers)):
            raise ValueError("widths, block_layers and decoder_layers need one entry per level")
        self.cfg = cfg
        dt = jnp.dtype(cfg.dtype)
        self.stem = _conv(cfg.in_channels, cfg.stem_features, 3, rngs, dt)
        enc, down = [], []
        cin = cfg.stem_features
        for w, n in zip(cfg.widths, cfg.block_layers, strict=True):
            enc.append(DenseResBlock(cin, w, n, cfg.growth_rate, rngs, dt))
            down.append(BnReluConv(w, w, 3, rngs, dt, stride=2))
            cin = w
        self.encoder, self.down = nnx.List(enc), nnx.List(down)
        self.bottleneck = DenseResBlock(
            cin,
            cfg.bottleneck_width,
            len(cfg.dilations),
            cfg.bottleneck_growth,
            rngs,
            dt,
            dilations=cfg.dilations,
        )
        up, dec = [], []
        cin = cfg.bottleneck_width
        for w, n in reversed(list(zip(cfg.widths, cfg.decoder_layers, strict=True))):
            up.append(_conv(cin, w, 3, rngs, dt))
            dec.append(DenseResBlock(2 * w, w, n, cfg.growth_rate, rngs, dt))
            cin = w
        self.up, self.decoder = nnx.List(up), nnx.List(dec)
        self.head_bn = _bn(cin, rngs, dt)
        # No ReLU follows the head: LeCun (variance 1 / fan_in) rather than He initialisation.
        self.head = _conv(
            cin, cfg.num_classes, 1, rngs, dt, bias=True, kernel_init=nnx.initializers.lecun_normal()
        )

    def window(self, hu: jax.Array) -> jax.Array:
        """HU -> [-1, 1] over ``[hu_min, hu_max]`` (clipped)."""
        lo, hi = self.cfg.hu_min, self.cfg.hu_max
        x = jnp.clip(hu.astype(jnp.float32), lo, hi)
        return ((x - lo) * (2.0 / (hi - lo)) - 1.0).astype(self.cfg.dtype)

    def __call__(self, hu: jax.Array) -> jax.Array:
        b, h, w, c = hu.shape
        m = 2**self.cfg.depth
        if h % m or w % m:
            raise ValueError(f"input {h}x{w} must be a multiple of 2^depth = {m} in height and width")
        if c != self.cfg.in_channels:
            raise ValueError(f"input has {c} channels (slices), the model expects {self.cfg.in_channels}")
        x = self.stem(self.window(hu))
        skips = []
        for block, down in zip(self.encoder, self.down, strict=True):
            x = block(x)
            skips.append(x)
            x = down(x)
        x = self.bottleneck(x)
        for up, block, skip in zip(self.up, self.decoder, reversed(skips), strict=True):
            x = upsample2x(x)
            x = block(jnp.concatenate([up(x), skip], axis=-1))
        logits = self.head(batchnorm.bn_relu(self.head_bn, x))
        return logits.astype(jnp.float32)


class Ensemble(nnx.Module):
    """K DenseRAUnets of one architecture (trained with different seeds) read as one model:
    ``(B, H, W, C)`` HU -> ``(B, H, W, num_classes)`` log of the members' mean class probabilities.

    ``softmax`` of the output is the mean of the members' softmax, so :func:`labels_from_logits` applies
    unchanged: calcium where the mean P(background) < 0.5, its artery the one of highest mean probability.
    The mean keeps a voxel only where most members call it: on the real sample (docs/experiments/, 2026-12-01)
    ensembles of three seeds made fewer false positives than their average member, at about their median
    member's recall. ``cfg`` is the members' (one architecture, input grid and window); the forward costs
    K members' forwards.
    """

    def __init__(self, members: list[DenseRAUnet]):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        cfg = members[0].cfg
        for m in members[1:]:
            if m.cfg != cfg:
                raise ValueError(f"ensemble members differ in architecture: {m.cfg} vs {cfg}")
        self.cfg = cfg
        self.members = nnx.List(members)

    def __call__(self, hu: jax.Array) -> jax.Array:
        probs = [jax.nn.softmax(m(hu), axis=-1) for m in self.members]
        mean = sum(probs[1:], probs[0]) / len(probs)
        return jnp.log(jnp.maximum(mean, jnp.finfo(jnp.float32).tiny))


def abstract_model(cfg: ModelConfig, members: int | None = None) -> DenseRAUnet | Ensemble:
    """The DenseRAUnet ``cfg`` describes (an :class:`Ensemble` of ``members`` of them when given) with
    ``jax.ShapeDtypeStruct`` leaves and nothing computed: the frame a loader fills with saved weights
    (``nnx.split`` it, replace the states, ``nnx.merge``)."""
    if members is None:
        return nnx.eval_shape(lambda: DenseRAUnet(cfg, rngs=nnx.Rngs(0)))
    return nnx.eval_shape(lambda: Ensemble([DenseRAUnet(cfg, rngs=nnx.Rngs(0)) for _ in range(members)]))


def new_model(cfg: ModelConfig, seed: int) -> DenseRAUnet:
    """A DenseRAUnet with initial weights drawn from ``seed`` (what ``DenseRAUnet(cfg, rngs=nnx.Rngs(seed))``
    draws, to float rounding) as one compiled program, the seed its argument: one compilation for every
    seed, kept by the persistent cache, run in milliseconds. Drawn op by op, the weights compiled one small
    program per array shape at every start (about 100 for the smoke model, 12-30 s on the 2-core
    development CPU); on CPU this one compiles at the lowest optimisation level (it runs once)."""
    graphdef, draw = _initialiser(cfg)
    return nnx.merge(graphdef, draw(jax.random.key(seed)))


@functools.lru_cache(maxsize=8)
def _initialiser(cfg: ModelConfig):
    """(graphdef, jitted key -> initial state) of :func:`new_model`, made once per config and process."""

    def draw(key: jax.Array) -> nnx.State:
        return nnx.state(DenseRAUnet(cfg, rngs=nnx.Rngs(key)))

    return nnx.graphdef(abstract_model(cfg)), jax.jit(draw, compiler_options=compile_cache.one_off_options())


def background_probability(logits: jax.Array) -> jax.Array:
    """P(background) ``(..., H, W)`` float32 from logits ``(..., H, W, K)``: the calcium rule's one input
    (:func:`labels_from_logits`; 1 minus it is ``Predictor.calcium_probability``)."""
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 0]


def labels_from_logits(logits: jax.Array, calcium_probability: float = 0.5) -> jax.Array:
    """Labels ``(..., H, W)`` uint8 from logits ``(..., H, W, K)``: calcium or not first, then the artery.

    A voxel is calcium when its calcium probability, 1 - P(background), exceeds ``calcium_probability``
    (default 0.5: the arteries together are more likely than background; an argmax over all K classes would
    call background a voxel whose calcium probability is split between arteries); its label is then the
    most likely artery. With K = 2 and 0.5 this is the plain argmax.
    """
    p_background = background_probability(logits)
    artery = jnp.argmax(logits[..., 1:], axis=-1) + 1
    return jnp.where(p_background < 1.0 - calcium_probability, artery, 0).astype(jnp.uint8)


def upsample2x(x: jax.Array) -> jax.Array:
    """Nearest-neighbour 2x upsampling of ``(B, H, W, C)`` by broadcast + reshape (its gradient is a sum)."""
    b, h, w, c = x.shape
    return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


def parameter_count(model: nnx.Module) -> int:
    """Number of trainable parameters (BatchNorm statistics excluded)."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def flops_per_slice(model: nnx.Module, height: int, width: int) -> float:
    """Forward FLOPs for one ``(H, W, C)`` input in eval mode, from XLA's cost analysis of the jitted call."""
    graphdef, state = nnx.split(model)

    def forward(state, x):
        m = nnx.merge(graphdef, state)
        m.eval()
        return m(x)

    x = jax.ShapeDtypeStruct((1, height, width, model.cfg.in_channels), jnp.float32)
    with cpu_kernels.xla_kernels():  # XLA counts no FLOPs inside the native custom calls
        cost = jax.jit(forward).lower(state, x).compile().cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    return float(cost["flops"])
