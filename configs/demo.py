"""What ``make demo`` trains: configs/smoke.py for a shorter schedule, sized so that phantoms -> shards ->
training -> scoring -> report fits in about 15 minutes on a 2-core CPU (~1000 steps of 96x96 crops)."""

import ml_collections

from configs import smoke


def get_config() -> ml_collections.ConfigDict:
    c = smoke.get_config()
    c.train.update(dict(steps=1000, warmup_steps=50, eval_every=1000, checkpoint_every=500))
    return c
