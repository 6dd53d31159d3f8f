"""Training from several shard folders at once: ``data.sources``.

``data.sources`` lists the folders a run draws its training slices from, each with a name and a sampling
weight: ``"phantom:SHARDS_A:0.7,real:SHARDS_B:0.3"``; an entry may name the split it draws from as a fourth
field (``real:REAL_SHARDS:0.3:all``; default ``train``). Empty, the run trains on ``data.shards`` alone
(one source named ``main``). The weights are the shares of slices each source gives the stream: grain's
``MapDataset.mix`` interleaves the sources' own shuffled streams in those proportions, deterministically, so
an exact resume resumes the mixture too. The first source's ``val`` split chooses the best checkpoint;
every other source with a ``val`` split gets figures of its own (``val_<name>_*``), watched, never a
selector.
"""

from __future__ import annotations

import dataclasses
import math
import re

from calcjax.core.config import ConfigError
from calcjax.data.input_pipeline import ShardSplit

NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class Source:
    """One training source: ``name`` (lower case, as in the metrics' keys), its shard ``folder``, its
    sampling ``weight`` (> 0; the weights are normalised over the sources) and the ``split`` it draws from."""

    name: str
    folder: str
    weight: float
    split: str = "train"


def _entry(text: str) -> Source:
    fields = text.strip().split(":")
    if len(fields) not in (3, 4) or not all(f.strip() for f in fields):
        raise ConfigError(
            f"data.sources entry {text.strip()!r}: write NAME:FOLDER:WEIGHT or NAME:FOLDER:WEIGHT:SPLIT"
        )
    name, folder, weight = (f.strip() for f in fields[:3])
    if not NAME.match(name):
        raise ConfigError(f"data.sources entry {text.strip()!r}: the name must match {NAME.pattern}")
    try:
        w = float(weight)
    except ValueError:
        w = math.nan
    if not (math.isfinite(w) and w > 0):
        raise ConfigError(f"data.sources entry {text.strip()!r}: the weight must be a finite number > 0")
    return Source(name, folder, w, fields[3].strip() if len(fields) == 4 else "train")


def parse_sources(spec: str, shards: str) -> list[Source]:
    """The sources of ``data.sources`` (module docstring), or ``data.shards`` as the one source ``main``
    when it is empty; ConfigError names the entry and the rule."""
    if not spec.strip():
        if not shards:
            raise ConfigError("give data.shards (one shard folder) or data.sources (several)")
        return [Source("main", shards, 1.0)]
    sources = [_entry(t) for t in spec.split(",")]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.sources: each source needs a name of its own, got {names}")
    return sources


def shares(sources: list[Source]) -> list[float]:
    """The normalised weights: each source's share of the training slices."""
    total = sum(s.weight for s in sources)
    return [s.weight / total for s in sources]


def training_splits(sources: list[Source]) -> list[tuple[ShardSplit, float]]:
    """Each source's split with its normalised weight: what ``input_pipeline.train_dataset`` mixes."""
    return [(ShardSplit.load(s.folder, s.split), w) for s, w in zip(sources, shares(sources), strict=True)]
