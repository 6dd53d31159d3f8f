"""``python -m calcjax.train``: the trainer (``calcjax.train.loop``).

``run`` is also the entry point of the console command ``calcjax-train``. It starts the program again
with huge pages (``calcjax.core.huge_pages``) before it imports the trainer: that import (jax, flax, orbax,
grain; about 3.5 s on the 2-core development CPU) would otherwise be paid twice.
"""

from calcjax.core import huge_pages


def run() -> None:
    """The console command ``calcjax-train``: :func:`calcjax.train.loop.run`, started with huge pages."""
    huge_pages.reexec_with_huge_pages()
    from calcjax.train.loop import run as run_trainer

    run_trainer()


if __name__ == "__main__":
    run()
