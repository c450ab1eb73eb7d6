"""Repeats over seeds: what counts as the same configuration, how `seeds=N` expands a sweep, and the
one-line errors for seeds that cannot work. The real seeded sweep is in test_compare.py."""

from __future__ import annotations

import pytest
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.utils import create_config_search_path
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import HydraContext, RunMode

from cnnlab.core.config import CONF_DIR, flatten
from cnnlab.tracking.repeats import configuration, configuration_id, sweep_problem, without_seed
from hydra_plugins.cnnlab_sweeper import SeedSweeper

from conftest import compose_cfg, tiny_overrides


def test_runs_differing_only_in_seed_and_machine_use_share_a_configuration():
    base = flatten(compose_cfg("paths.output_dir=/runs/a"))
    same = flatten(compose_cfg("paths.output_dir=/runs/b", "seed=7", "runtime.num_threads=1",
                               "tracking.experiment_name=zoo", "callbacks.progress_bar.refresh_rate=0"))
    assert configuration_id(base) == configuration_id(same)
    assert "<output_dir>/models" in configuration(base).values()  # the checkpoint folder, made job-independent
    for change in ("optimizer.lr=0.0003", "model=cnn_wide", "data=fashion_mnist", "trainer.max_epochs=3",
                   "runtime.channels_last=false"):
        assert configuration_id(flatten(compose_cfg("paths.output_dir=/runs/a", change))) != configuration_id(base)


def test_the_id_from_logged_params_equals_the_id_from_the_config():
    """compare reads params as MLflow stores them (text); training tags the id from the config."""
    params = flatten(compose_cfg())
    as_logged = {k: "null" if v is None else str(v) for k, v in params.items()}
    assert configuration_id(as_logged) == configuration_id(params)


def test_without_seed_names_the_configuration_in_the_sweeps_words():
    assert without_seed(["model=cnn", "seed=43", "seeds=3", "+x=1"]) == "model=cnn +x=1"
    assert without_seed(["seed=1"]) == "(none)"


def _jobs(*args: str, max_batch_size: int | None = None) -> list[list[list[str]]]:
    """The batches of jobs SeedSweeper makes of a `-m` command line, composing conf/ as Hydra does."""
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR)))
    config = loader.load_configuration("config", overrides=list(args), run_mode=RunMode.MULTIRUN)
    sweeper = SeedSweeper(max_batch_size=max_batch_size, params=config.hydra.sweeper.params)
    sweeper.config, sweeper.hydra_context = config, HydraContext(config_loader=loader, callbacks=None)
    overrides = sweeper._parse_config() + list(args)  # as BasicSweeper.sweep: hydra.sweeper.params first
    return sweeper.split_arguments(OverridesParser.create(config_loader=loader).parse_overrides(overrides),
                                   max_batch_size)


def test_seeds_repeat_every_job_seed_major():
    [jobs] = _jobs("model=cnn,cnn_strided", "optimizer.lr=0.001", "seeds=3")
    assert jobs == [[f"model={m}", "optimizer.lr=0.001", "seeds=3", f"seed={s}"]
                    for s in (42, 43, 44) for m in ("cnn", "cnn_strided")]
    assert _jobs("seed=7", "seeds=2") == [[["seeds=2", "seed=7"], ["seeds=2", "seed=8"]]]  # from the given seed
    assert _jobs("model=cnn,cnn_wide") == [[["model=cnn"], ["model=cnn_wide"]]]  # seeds=1: Hydra's basic sweeper
    [[*first, _], *rest] = _jobs("model=cnn,cnn_wide,cnn_same", "seeds=2", max_batch_size=4)
    assert [len(b) for b in [[*first, _], *rest]] == [4, 2]  # batches keep every job


def test_seeds_set_by_an_experiment_repeat_its_jobs_even_when_experiments_are_swept():
    [jobs] = _jobs("experiment=zoo")  # the file sets seeds: 3 and sweeps six models
    zoo = ("cnn", "cnn_same", "cnn_strided", "cnn_wide", "cnn_deep", "cnn_regularized")
    assert len(jobs) == 18 and jobs[:6] == [[f"model={m}", "experiment=zoo", "seed=42"] for m in zoo]
    [jobs] = _jobs("experiment=zoo,heads")  # each job's own config says how many seeds it gets
    assert jobs == [[f"experiment={e}", f"seed={s}"] for s in (42, 43, 44) for e in ("zoo", "heads")]


@pytest.mark.parametrize("seeds, seed, overrides, sweeper, problem", [
    (0, 42, [], "x.SeedSweeper", "config seeds: expected an integer >= 1 (seeds per configuration), got 0"),
    ("abc", 42, [], "x.SeedSweeper", "config seeds: expected an integer >= 1 (seeds per configuration), got 'abc'"),
    (2, 42, ["seed=1,2"], "x.SeedSweeper", "config seeds: seeds=2 counts from one seed"),
    (2, 42, ["++seed=1,2"], "x.SeedSweeper", "config seeds: seeds=2 counts from one seed"),
    (2, 42, ["seeds=2,3"], "x.SeedSweeper", "config seeds: a number of seeds per configuration, not a sweep"),
    (2, 42, [], "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
     "config seeds: seeds=2 repeats the jobs of cnnlab's sweeper, not of hydra_plugins.hydra_optuna_sweeper"),
    (1, 42, ["seed=1,2"], "anything", None),
    (3, 5, ["seed=5"], "x.SeedSweeper", None),
])
def test_sweep_problems(seeds, seed, overrides, sweeper, problem):
    found = sweep_problem(seeds, seed, overrides, sweeper)
    assert found == problem if problem is None else found.startswith(problem)


@pytest.mark.parametrize("args, message", [
    (["seeds=3"], "error: config seeds: seeds=3 repeats the jobs of a sweep, and this is one run: add -m"),
    (["-m", "seeds=2", "seed=1,2"], "error: config seeds: seeds=2 counts from one seed"),
    (["-m", "seeds=0"], "error: config seeds: expected an integer >= 1"),
    (["-m", "seeds=2", "hparams_search=optuna"], "error: config seeds: seeds=2 repeats the jobs of cnnlab's sweeper"),
], ids=["one-run", "seed-list", "zero", "optuna"])
def test_seeds_that_cannot_work_are_one_line_before_any_run(tiny_dataset, tmp_path, train_command, args, message):
    (tmp_path / "mlflow.db").unlink()  # the test's store: it must not even be created
    result = train_command(*args, *tiny_overrides(tiny_dataset, tmp_path), cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors and errors[0].startswith(message) and "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists()  # checked before the store was touched: no run, no parent run


def test_a_configuration_id_is_the_same_before_and_after_the_package_moved_into_wings():
    """conf/ names classes by their new paths (cnnlab.training.checkpoints...); runs logged before the
    move hold the old ones, and remain repeats of the same configuration."""
    from cnnlab.tracking.repeats import configuration_id

    old = {"trainer.plugins.0._target_": "cnnlab.checkpoints.AtomicCheckpointIO",
           "callbacks.nan_guard._target_": "cnnlab.callbacks.NonFiniteLossGuard", "model.name": "cnn"}
    new = {"trainer.plugins.0._target_": "cnnlab.training.checkpoints.AtomicCheckpointIO",
           "callbacks.nan_guard._target_": "cnnlab.training.callbacks.NonFiniteLossGuard", "model.name": "cnn"}
    assert configuration_id(old) == configuration_id(new)
    assert configuration_id(new) != configuration_id({**new, "model.name": "other"})
