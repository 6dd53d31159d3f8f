"""``python -m calcjax.score``: the cohort scorer (``calcjax.score.cohort``).

``run`` is also the entry point of the console command ``calcjax-score``.
"""

from calcjax.score.cohort import run

if __name__ == "__main__":
    run()
