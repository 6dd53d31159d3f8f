"""The recipe of the shipped model (``calcjax/model/shipped/README.md``): ``configs/smoke.py`` for 1600 steps
with the randomisation keys against the phantom's tells (run C, docs/experiments/). Train it on 48 v3
phantoms:

  python -m data_prep.phantom --out P --scans 48 --protocol mixed --seed 1 --phantom_version 3 --workers 2
  python -m data_prep.build --input P --out S --split train=0.8,val=0.1,test=0.1 --salt calcjax-model-v1
  python -m calcjax.train --config configs/shipped.py --workdir RUN --config.data.shards=S \
      [--config.data.real_val_shards=real_shards/gated-1]
"""

import ml_collections

from configs import smoke


def get_config() -> ml_collections.ConfigDict:
    c = smoke.get_config()
    c.data.update(dict(blur_px=1.5, hu_offset=30.0, noise_correlation_px=1.5))
    c.train.update(dict(steps=1600, eval_every=800, checkpoint_every=400))
    return c
