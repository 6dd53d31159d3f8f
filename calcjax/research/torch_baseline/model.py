"""DenseRAUnet in PyTorch, layer for layer the twin of ``calcjax.model.network`` (NCHW).

Module names equal the Flax NNX attribute paths (``encoder.0.layers.1.conv``...), so weight conversion is a
rename plus a kernel transpose (``calcjax.research.torch_baseline.convert``). Same window, explicit padding,
BatchNorm momentum 0.1 (= Flax 0.9) and epsilon 1e-5, nearest-neighbour 2x upsampling by repetition.
"""

from __future__ import annotations

import torch
from torch import nn

from calcjax.model.network import BN_EPSILON, BN_MOMENTUM, ModelConfig


def _conv(cin, cout, k, *, stride=1, dilation=1, bias=False):
    return nn.Conv2d(cin, cout, k, stride=stride, padding=dilation * (k // 2), dilation=dilation, bias=bias)


def _bn(n):
    return nn.BatchNorm2d(n, eps=BN_EPSILON, momentum=1.0 - BN_MOMENTUM)


class BnReluConv(nn.Module):
    def __init__(self, cin, cout, k, *, stride=1, dilation=1):
        super().__init__()
        self.bn = _bn(cin)
        self.conv = _conv(cin, cout, k, stride=stride, dilation=dilation)

    def forward(self, x):
        return self.conv(torch.relu(self.bn(x)))


class DenseResBlock(nn.Module):
    def __init__(self, cin, cout, layers, growth, dilations=None):
        super().__init__()
        dilations = dilations or (1,) * layers
        self.layers = nn.ModuleList(
            [BnReluConv(cin + i * growth, growth, 3, dilation=dilations[i]) for i in range(layers)]
        )
        self.fuse = BnReluConv(layers * growth, cout, 1)
        self.shortcut = _conv(cin, cout, 1)

    def forward(self, x):
        feats, outs = x, []
        for layer in self.layers:
            y = layer(feats)
            outs.append(y)
            feats = torch.cat([feats, y], dim=1)
        return self.fuse(torch.cat(outs, dim=1)) + self.shortcut(x)


class DenseRAUnet(nn.Module):
    """``(B, C, H, W)`` HU -> ``(B, num_classes, H, W)`` logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.stem = _conv(cfg.in_channels, cfg.stem_features, 3)
        self.encoder, self.down = nn.ModuleList(), nn.ModuleList()
        cin = cfg.stem_features
        for w, n in zip(cfg.widths, cfg.block_layers, strict=True):
            self.encoder.append(DenseResBlock(cin, w, n, cfg.growth_rate))
            self.down.append(BnReluConv(w, w, 3, stride=2))
            cin = w
        self.bottleneck = DenseResBlock(
            cin, cfg.bottleneck_width, len(cfg.dilations), cfg.bottleneck_growth, dilations=cfg.dilations
        )
        self.up, self.decoder = nn.ModuleList(), nn.ModuleList()
        cin = cfg.bottleneck_width
        for w, n in reversed(list(zip(cfg.widths, cfg.decoder_layers, strict=True))):
            self.up.append(_conv(cin, w, 3))
            self.decoder.append(DenseResBlock(2 * w, w, n, cfg.growth_rate))
            cin = w
        self.head_bn = _bn(cin)
        self.head = _conv(cin, cfg.num_classes, 1, bias=True)

    def window(self, hu):
        lo, hi = self.cfg.hu_min, self.cfg.hu_max
        return (hu.to(self.stem.weight.dtype).clamp(lo, hi) - lo) * (2.0 / (hi - lo)) - 1.0

    def forward(self, hu):
        m = 2**self.cfg.depth
        if hu.shape[-2] % m or hu.shape[-1] % m:
            raise ValueError(f"input {tuple(hu.shape[-2:])} must be a multiple of 2^depth = {m}")
        x = self.stem(self.window(hu))
        skips = []
        for block, down in zip(self.encoder, self.down, strict=True):
            x = block(x)
            skips.append(x)
            x = down(x)
        x = self.bottleneck(x)
        for up, block, skip in zip(self.up, self.decoder, reversed(skips), strict=True):
            x = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(torch.relu(self.head_bn(x)))
