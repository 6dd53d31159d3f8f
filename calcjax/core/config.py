"""The keys a training config may hold, and strict reading of a config block into its dataclass.

The numbers live in ``configs/*.py`` only: the dataclasses that carry them
(``calcjax.model.network.ModelConfig``,
``calcjax.train.step.LossConfig``, ``calcjax.data.input_pipeline.AugmentConfig``) have no defaults, and
:func:`fields_of` refuses a block that lacks one of their fields or holds a key nobody reads, naming the key
and the nearest valid one (a misspelt ``config.model.growth_rat`` is an error, not a silently ignored
line). ``calcjax.train.config.check_config`` checks a whole config (``model``, ``loss``, ``data``, ``train``)
before a trainer uses it.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping


class ConfigError(ValueError):
    """A config key that is unknown or missing (the message names it)."""


def _unknown(block: str, key: str, valid: Iterable[str]) -> ConfigError:
    valid = sorted(valid)
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {block}.{near[0]}?" if near else ""
    return ConfigError(f"unknown config key {block}.{key}{hint} (valid keys: {', '.join(valid)})")


def check_keys(block: Mapping, name: str, valid: Iterable[str]) -> None:
    """Raises :class:`ConfigError` for the first key of ``block`` not in ``valid``."""
    valid = set(valid)
    for key in block:
        if key not in valid:
            raise _unknown(name, key, valid)


def fields_of(cls, block: Mapping, name: str, *, also: Iterable[str] = ()) -> dict:
    """The keyword arguments of dataclass ``cls`` read from config ``block`` (called ``name`` in messages):
    every field must be there; keys other than the fields and ``also`` (read by someone else) are errors.
    Lists become tuples (ml_collections and JSON give lists)."""
    names = [f.name for f in dataclasses.fields(cls)]
    check_keys(block, name, [*names, *also])
    missing = [n for n in names if n not in block]
    if missing:
        raise ConfigError(f"config block {name} lacks {', '.join(missing)} (configs/default.py has them all)")
    return {n: tuple(block[n]) if isinstance(block[n], list | tuple) else block[n] for n in names}
