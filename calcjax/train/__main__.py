"""``python -m calcjax.train``: the trainer (``calcjax.train.loop``).

``run`` is also the entry point of the console command ``calcjax-train``.
"""

from calcjax.train.loop import run

if __name__ == "__main__":
    run()
