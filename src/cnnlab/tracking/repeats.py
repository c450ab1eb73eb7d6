"""Repeats: one configuration trained with several seeds, so that a comparison can tell a real
difference from what the seed alone moves.

- The `seeds` knob: the default sweeper (conf/hydra/sweeper/seeds.yaml, SeedSweeper in
  src/hydra_plugins/cnnlab_sweeper/, where Hydra requires plugins to live) repeats every job of a
  sweep with `seeds` seeds, `python -m cnnlab.train -m experiment=zoo seeds=3`.
- `configuration_id` names what a run repeats: its config without the seed and without what only
  says where results go or how the machine is shared. Every run carries it as a tag
  (keys.CONFIGURATION), and `cnnlab compare` groups runs by it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

from cnnlab.core import keys

# Flattened config keys (exact, or prefixes ending in ".") that do not change what is trained, so
# two runs differing only in them repeat one configuration. Everything else does, new knobs
# included: an unknown key splits groups rather than merging different trainings.
NOT_THE_CONFIGURATION = (
    "seed", "seeds",                                          # what repeats vary
    "paths.", "tracking.", "logger.", "evaluate.", "fetch.",  # where data, outputs and records go
    "data.sources.",                                          # where files come from (data.files: their checksums)
    "data.path",                                              # where a folder is (its content: the data.checksum tag)
    "optimized_metric",                                       # what a sweeper reads, not how a model trains
    "data.split.",                                            # sizes derived from data.val_size (logged with them)
    "data.eval_batch_size",                                   # how evaluation is batched
    "runtime.num_threads", "runtime.malloc_keep_memory",      # how the machine is shared
    "callbacks.progress_bar.", "trainer.enable_progress_bar",  # what the terminal shows
    "trainer.enable_model_summary", "trainer.log_every_n_steps",
    "callbacks.model_profile.", "callbacks.mlflow_model.", "callbacks.epoch_curves.",  # what is measured and kept
)


# Knobs whose `auto` each machine resolves (cnnlab.training.runtime), and the tags that record what a run used.
# A run's configuration holds what it used, so runs of one config on machines that chose differently
# (bf16 on one, fp32 on another) are never pooled as repeats of one configuration.
# The device too: a CPU run and a GPU run of one config compute differently (kernels, TF32), and
# trainer.devices=auto means as many processes (a global batch that many times larger) as GPUs.
USED_TAGS = {"trainer.precision": keys.PRECISION, "runtime.channels_last": keys.CHANNELS_LAST,
             "trainer.accelerator": keys.ACCELERATOR, "trainer.devices": keys.NUM_DEVICES,
             "optimizer.fused": keys.FUSED_OPTIMIZER, "trainer.benchmark": keys.CUDNN_BENCHMARK}


def as_used(params: Mapping[str, object], tags: Mapping[str, str]) -> dict:
    """A run's MLflow params with what it used in place of what it asked (`auto`)."""
    return {**params, **{key: tags[tag] for key, tag in USED_TAGS.items() if key in params and tag in tags}}


def override_key(override: str) -> str:
    """`++seed=3` -> `seed`: the config key a Hydra override sets."""
    return override.split("=", 1)[0].lstrip("+~")


def is_configuration(key: str) -> bool:
    """Does this flattened config key (or an override's key: a whole section, `callbacks.mlflow_model`)
    belong to what a run repeats?"""
    return not any(key == p or (p.endswith(".") and (key.startswith(p) or key == p[:-1]))
                   for p in NOT_THE_CONFIGURATION)


# Classes named in the config (`_target_`) by the paths they had before the package moved into
# wings (core/, tracking/, training/, analysis/), so that a run's configuration id stays what it was.
PRE_WINGS_TARGETS = {"cnnlab.training.": "cnnlab.", "cnnlab.tracking.logger.": "cnnlab.mlflow_logger."}


def pre_wings_target(value: str) -> str:
    """`cnnlab.training.checkpoints.AtomicCheckpointIO` -> `cnnlab.checkpoints.AtomicCheckpointIO`."""
    for new, old in PRE_WINGS_TARGETS.items():
        if value.startswith(new):
            return old + value[len(new):]
    return value


def configuration(params: Mapping[str, object]) -> dict[str, str]:
    """The keys and values (as MLflow stores them: text) that make up a run's configuration, from its
    flattened config or its MLflow params. Paths inside the output folder (the checkpoint folder,
    the trainer's root) start with a placeholder instead: the folder differs per job."""
    output_dir = str(params.get("paths.output_dir", "") or "")
    text = {k: "null" if v is None else str(v) for k, v in params.items() if is_configuration(k)}
    text = {k: pre_wings_target(v) if k.endswith("_target_") else v for k, v in text.items()}
    if output_dir:
        text = {k: "<output_dir>" + v[len(output_dir):] if v == output_dir or v.startswith(output_dir.rstrip("/") + "/")
                else v for k, v in text.items()}
    return text


def configuration_id(params: Mapping[str, object]) -> str:
    """A short stable name for the configuration: equal for runs that differ only in seed."""
    blob = json.dumps(configuration(params), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def without_seed(overrides: Iterable[str]) -> str:
    """A job's Hydra overrides minus its seed: the configuration in the words the sweep used."""
    return " ".join(o for o in overrides if override_key(o) not in ("seed", "seeds")) or "(none)"


def seeds_problem(seeds: object) -> str | None:
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        return f"config seeds: expected an integer >= 1 (seeds per configuration), got {seeds!r}"
    return None


def sweep_problem(seeds: object, seed: object, overrides: list[str], sweeper: str) -> str | None:
    """What is wrong with a sweep's seeds, in one line naming the key, or None. Checked as the sweep
    starts (cnnlab.training.sweep_parent.SweepParentRunCallback), before its parent run or any job."""
    swept = {override_key(o) for o in overrides if "," in o or "(" in o}
    if "seeds" in swept:
        return "config seeds: a number of seeds per configuration, not a sweep dimension (seeds=a,b)"
    problem = seeds_problem(seeds)
    if problem or seeds == 1:
        return problem
    if not sweeper.endswith(".SeedSweeper"):
        # Optuna's sweeper would not repeat its trials: seeds would silently mean nothing.
        return f"config seeds: seeds={seeds} repeats the jobs of cnnlab's sweeper, not of {sweeper}"
    if "seed" in swept or not str(seed).isdigit():
        return (f"config seeds: seeds={seeds} counts from one seed (seed=N, now {seed!r}); "
                f"a list of seeds (seed=a,b,...) is a sweep of its own: give one or the other")
    return None
