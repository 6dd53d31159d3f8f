"""A small DenseRAUnet that trains on this 2-core CPU in minutes (phantoms, 96x96 crops, float32)."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.model.update(
        dict(
            stem_features=16,
            widths=(16, 32, 64),
            block_layers=(2, 2, 2),
            growth_rate=8,
            bottleneck_width=128,
            bottleneck_growth=16,
            dilations=(1, 2, 4),
            decoder_layers=(2, 2, 2),
            dtype="float32",
        )
    )
    c.loss.update(dict(k_min=64))
    c.data.update(dict(crop=96, worker_count=0))
    c.train.update(
        dict(
            batch_size=8,
            steps=1200,
            learning_rate=3e-3,
            warmup_steps=50,
            eval_every=300,
            eval_max_scans=3,  # the last evaluation uses every val scan
            checkpoint_every=300,
        )
    )
    return c
