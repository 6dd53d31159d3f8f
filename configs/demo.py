"""What ``make demo`` trains: configs/smoke.py for a shorter schedule, sized so that phantoms -> shards ->
training -> scoring -> report fits in about 15 minutes on a 2-core CPU (800 steps of 96x96 crops)."""

import ml_collections

from configs import smoke


def get_config() -> ml_collections.ConfigDict:
    c = smoke.get_config()
    c.train.update(dict(steps=800, warmup_steps=50, eval_every=800, checkpoint_every=400))
    return c
