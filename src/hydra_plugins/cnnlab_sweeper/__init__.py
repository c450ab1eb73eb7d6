"""cnnlab's Hydra sweeper (conf/hydra/sweeper/seeds.yaml). Hydra instantiates only plugin classes
defined in the hydra_plugins package, so it lives here rather than in cnnlab.tracking.repeats."""

from __future__ import annotations

import logging

from hydra.core.override_parser.types import Override

# Imported for its OmegaConf resolvers (data=folder's class folders, conf/config.yaml's run
# folders): Hydra imports every plugin when it starts, so a process that composes conf/ without
# cnnlab, as `dvc exp run -S` does, resolves them too.
import cnnlab.core.config  # noqa: F401
from cnnlab.core.errors import exit_with
from cnnlab.core.internals import basic_sweeper
from cnnlab.tracking.repeats import override_key, seeds_problem

BasicSweeper = basic_sweeper()

log = logging.getLogger(__name__)


class SeedSweeper(BasicSweeper):
    """Hydra's basic sweeper (grids from `a,b` overrides and hydra.sweeper.params), with every job
    repeated for its `seeds` seeds: seed, seed + 1, ..., counted from the job's own `seed`. Both are
    read from each job's composed config, so an experiment file that sets `seeds: 3` repeats its
    jobs even when several experiments are swept. Seed-major order: all configurations with their
    first seed, then the second, so a sweep cut short still has every configuration once, and slow
    moments of the machine spread over all of them. `seeds: 1` is the basic sweeper. A list of
    seeds (`seed=1,2,3`) is Hydra's own sweep; both at once are refused as the sweep starts
    (cnnlab.tracking.repeats.sweep_problem).
    """

    def __init__(self, max_batch_size: int | None = None, params: dict | None = None):
        # BasicSweeper.__init__ calls super(BasicSweeper, self), which fails once Hydra's plugin scan
        # has executed its module again (Plugins uses loader.load_module: a second BasicSweeper class).
        # The attributes it sets, set here:
        self.overrides, self.batch_index, self.max_batch_size, self.params = None, 0, max_batch_size, params or {}
        self.hydra_context, self.config, self.launcher = None, None, None

    def split_arguments(self, overrides: list[Override], max_batch_size: int | None) -> list[list[list[str]]]:
        jobs = [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
        counts = [self._seeds_of(job) for job in jobs]
        if all(n == 1 for n, _ in counts):  # the basic sweeper's jobs, as it would batch them
            return list(BasicSweeper.split_overrides_to_chunks(jobs, max_batch_size))
        repeated = [[o for o in job if override_key(o) != "seed"] + [f"seed={start + i}"]
                    for i in range(max(n for n, _ in counts))
                    for job, (n, start) in zip(jobs, counts) if i < n]
        log.info("%d configurations, %d jobs with their seeds", len(jobs), len(repeated))
        return list(BasicSweeper.split_overrides_to_chunks(repeated, max_batch_size))

    def _seeds_of(self, job: list[str]) -> tuple[int, int]:
        """(seeds, first seed) of one job, from its composed config."""
        loader = self.hydra_context.config_loader if self.hydra_context else None
        config = loader.load_sweep_config(self.config, list(job)) if loader else self.config
        problem = seeds_problem(config.get("seeds", 1))
        seed = config.get("seed")
        if problem or not str(seed).isdigit():
            # Hydra would print a sweeper's exception with its traceback: one line, as for the job's config.
            exit_with(f"{problem or f'config seed: expected an integer >= 0, got {seed!r}'} "
                      f"(job {' '.join(job) or '(no overrides)'})")
        return config.seeds if "seeds" in config else 1, int(seed)
