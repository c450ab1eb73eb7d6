"""cnnlab's Hydra sweeper (conf/hydra/sweeper/seeds.yaml). Hydra instantiates only plugin classes
defined in the hydra_plugins package, so it lives here rather than in cnnlab.repeats."""

from __future__ import annotations

import logging

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.types import Override

log = logging.getLogger(__name__)


class SeedSweeper(BasicSweeper):
    """Hydra's basic sweeper (grids from `a,b` overrides and hydra.sweeper.params), with every job
    repeated for `seeds` seeds: seed, seed + 1, ..., from the job's own `seed` (the config's, or the
    one it overrides). Seed-major order: all configurations with the first seed, then the second,
    so a sweep cut short still has every configuration once, and slow machine moments spread over
    all of them rather than one. `seeds: 1` is the basic sweeper. Hydra's own params give the
    seeds too (`seed=1,2,3`); both at once are refused, as the repeats would overlap.
    """

    def __init__(self, max_batch_size: int | None = None, params: dict | None = None, seeds: object = 1):
        # BasicSweeper.__init__ calls super(BasicSweeper, self), which fails once Hydra's plugin scan
        # has executed its module again (Plugins uses loader.load_module: a second BasicSweeper class).
        # The attributes it sets, set here:
        self.overrides, self.batch_index, self.max_batch_size, self.params = None, 0, max_batch_size, params or {}
        self.hydra_context, self.config, self.launcher = None, None, None
        self.seeds = seeds

    def split_arguments(self, overrides: list[Override], max_batch_size: int | None) -> list[list[list[str]]]:
        # `seeds` and `seed` were checked as the sweep started (cnnlab.repeats.sweep_problem).
        if self.seeds == 1:
            return BasicSweeper.split_arguments(overrides, max_batch_size)
        jobs = [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
        repeated = []
        for i in range(self.seeds):
            for job in jobs:
                own = [o.split("=", 1)[1] for o in job if o.split("=", 1)[0] == "seed"]
                start = int(own[-1]) if own else int(self.config.seed)
                repeated.append([o for o in job if o.split("=", 1)[0] != "seed"] + [f"seed={start + i}"])
        log.info("%d configurations x %d seeds = %d jobs", len(jobs), self.seeds, len(repeated))
        size = max_batch_size or len(repeated)
        return [repeated[i:i + size] for i in range(0, len(repeated), size)]
