"""The recipe for the full COCA release (789 gated scans with calcium masks): the paper's network
(``configs/default.py``, 3.3 M parameters) trained from fresh weights on the release's gated scans, with
phantoms mixed in or not. ``make train-coca COCA=/path/to/cocacalciumandchestcts`` runs it (build with
patient-level splits, train, score the gated test split and the chest scans against the release's sheet);
docs/training.md has the three plain commands and what it costs on a CPU, one GPU and eight.

``data.sources`` is set on the command line: ``coca:GATED_SHARDS:1`` alone, or with
``phantom:PHANTOM_SHARDS:0.25`` after it (the first source's val split, COCA's, chooses the checkpoint).

Steps: 20,000 of batch 16 is 320,000 slices, about 8 passes over the release's ~40,000 gated slices; the
paper gives no schedule, and these figures are ours, not chosen by any run yet.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.data.update(dict(crop=512, worker_count=8))
    c.train.update(
        dict(
            batch_size=16,
            steps=20_000,
            learning_rate=1e-3,
            warmup_steps=500,
            eval_every=1_000,
            eval_max_scans=0,
            checkpoint_every=1_000,
        )
    )
    return c
