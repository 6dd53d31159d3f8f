"""What the compiler is given: the size and make-up of a train step's program (one JSON line per config).

  python bench/hlo_profile.py [--configs smoke,default]

The train step (``calcjax.train.step``) of each config at its training shape is lowered, not compiled,
and its StableHLO text counted: operations in all, convolutions (XLA's, or on a CPU calcjax's oneDNN
custom calls) and how many distinct convolution shapes (each one a kernel XLA must choose, and on GPU
autotune), concatenations (the dense blocks' growing
feature stacks), type conversions (``convert``: bfloat16 <-> float32) and the text's size. Compilation
time grows with these; ``bench/compile.py`` times it.

  {"bench": "hlo_profile", "config": "default", "ops": ..., "convolutions": ...,
   "distinct_convolution_shapes": ..., "concatenates": ..., "converts": ..., "kilobytes": ...}
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

OP = re.compile(r"=\s*(?:\"?)(stablehlo\.[a-z_]+)")
# XLA's convolution op, or on a CPU calcjax's oneDNN custom calls (calcjax.model.conv): one line per
# convolution pass either way (forward, and the two of its gradient).
CONVOLUTION = re.compile(r"stablehlo\.convolution|stablehlo\.custom_call @calcjax_onednn_conv_")


def profile(text: str) -> dict:
    """Counts of the StableHLO text's operations (module docstring)."""
    ops = OP.findall(text)
    conv_lines = [line for line in text.splitlines() if CONVOLUTION.search(line)]
    shapes = {line.split(":")[-1].strip() for line in conv_lines}
    return {
        "ops": len(ops),
        "convolutions": len(conv_lines),
        "distinct_convolution_shapes": len(shapes),
        "concatenates": sum(op == "stablehlo.concatenate" for op in ops),
        "converts": sum(op == "stablehlo.convert" for op in ops),
        "kilobytes": round(len(text) / 1024, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="smoke,default")
    args = p.parse_args()
    from bench.compile import _train_step_lowered

    for config in args.configs.split(","):
        text = _train_step_lowered(config).as_text()
        print(json.dumps({"bench": "hlo_profile", "config": config, **profile(text)}), flush=True)


if __name__ == "__main__":
    main()
