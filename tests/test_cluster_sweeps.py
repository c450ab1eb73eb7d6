"""Sweeps through the cluster launchers (conf/hydra/launcher/{ray,slurm,submitit_local}.yaml), run for
real on this machine: a Ray cluster, submitit's local executor and a one-node SLURM cluster, each
started by the test on 127.0.0.1 in a temporary folder and stopped after it. Every job must be a
child of the sweep's MLflow parent run, and must have run where the launcher says it did."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from cnnlab.core import keys
from cnnlab.core.config import CONF_DIR
from cnnlab.training import runtime

from conftest import tiny_overrides

BIN = Path(sys.executable).parent
# One more torch thread than this machine has CPUs: `runtime.num_threads: auto` never picks that
# many (it is capped at the usable CPUs), so a job that trains on it got it from its launcher.
GIVEN_THREADS = runtime.usable_cpus() + 1


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all held open until all are chosen)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def _sweep(cwd: Path, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "cnnlab.train", "-m", *args], cwd=cwd, capture_output=True,
                            text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def _sweep_runs(launcher: str):
    """The one sweep parent run (its launcher tag checked) and its children, from this test's store."""
    client = MlflowClient()
    exp = client.get_experiment_by_name("cnnlab")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get(keys.ROLE) == keys.ROLE_SWEEP]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["hydra.launcher"].endswith(launcher)
    children = [r for r in runs if r.info.run_id != parent.info.run_id]
    assert children and all(c.data.tags.get("mlflow.parentRunId") == parent.info.run_id for c in children)
    assert parent.data.tags[keys.CHILDREN] == str(len(children))
    return parent, children


def _job_folders(sweep_dir: Path) -> dict[str, Path]:
    """submitit's folder of each job that ran, named after its job id and holding its result (beside
    them, `%j` or the array's id hold what was submitted)."""
    return {p.name: p for p in (sweep_dir / ".submitit").iterdir() if list(p.glob(f"{p.name}_*result.pkl"))}


def _pid(run) -> int:
    return int(run.data.tags[keys.PROCESS].split(":")[0])


def _stop(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM a process the test started (its own session), then SIGKILL its group if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _kill_leftovers(marker: str) -> None:
    """SIGKILL processes whose command line names `marker` (this test's temporary folder): a Ray worker
    or a SLURM job step left behind by a failed test. Nothing else matches that folder."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)


def _wait_for(check, timeout_s: float, what: str, log: Path, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not ready after {timeout_s} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


# --- the launcher configs ------------------------------------------------------------------------


def test_cluster_launcher_configs_compose_and_reach_the_launchers(tmp_path, monkeypatch):
    """Each config composes with conf/, names the plugin's launcher, and its values reach it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        ray_cfg = compose("config", ["hydra/launcher=ray", "hydra.launcher.ray.init.address=auto",
                                     "hydra.launcher.ray.remote.num_cpus=4"], return_hydra_config=True)
        slurm_cfg = compose("config", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                       "hydra.launcher.timeout_min=90", "hydra.launcher.tasks_per_node=4",
                                       "hydra.launcher.gpus_per_node=4", "hydra.launcher.cpus_per_task=8"],
                            return_hydra_config=True)
        local_cfg = compose("config", ["hydra/launcher=submitit_local"], return_hydra_config=True)
    ray = instantiate(ray_cfg.hydra.launcher)
    assert type(ray).__name__ == "RayLauncher"
    init = OmegaConf.to_container(ray.ray_cfg.init, resolve=True)
    assert init["address"] == "auto" and init["object_store_memory"] is None
    assert init["runtime_env"]["env_vars"] == {runtime.LAUNCH_DIR_ENV: str(tmp_path),
                                               "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}
    module, _, name = init["runtime_env"]["worker_process_setup_hook"].rpartition(".")
    assert getattr(__import__(module, fromlist=[name]), name) is runtime.ray_worker_setup
    assert OmegaConf.to_container(ray.ray_cfg.remote) == {"num_cpus": 4, "num_gpus": 0}
    slurm = instantiate(slurm_cfg.hydra.launcher)
    assert type(slurm).__name__ == "SlurmLauncher"
    assert {k: slurm.params[k] for k in ("partition", "timeout_min", "tasks_per_node", "gpus_per_node",
                                         "cpus_per_task", "nodes", "mem_gb")} == {
        "partition": "gpu", "timeout_min": 90, "tasks_per_node": 4, "gpus_per_node": 4, "cpus_per_task": 8,
        "nodes": 1, "mem_gb": 16}
    local = instantiate(local_cfg.hydra.launcher)
    assert type(local).__name__ == "LocalLauncher" and local.params["gpus_per_node"] == 0


# --- Ray -----------------------------------------------------------------------------------------


@pytest.fixture
def ray_cluster():
    """A Ray head on 127.0.0.1 (`ray start --head --block`, its own session and temp dir, every port
    chosen free, so other Ray clusters on the machine are untouched); yields (address, temp dir).
    `ray start` runs in the temp dir, not where the sweep runs: a worker starts in that folder."""
    ray = BIN / "ray"
    if not ray.exists():
        pytest.skip("ray is not installed (pip install -e '.[cluster]')")
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    port, client, agent, agent_grpc, env_agent, metrics, node_mgr, obj_mgr, dash = _free_ports(9)
    cmd = [str(ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
           f"--num-cpus={2 * GIVEN_THREADS}", "--include-dashboard=false", "--disable-usage-stats",
           f"--temp-dir={temp}", f"--ray-client-server-port={client}", f"--dashboard-port={dash}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
           f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}"]
    # Without the test's MLflow store in its environment: the jobs must get it from the sweep.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    log = temp / "ray-start.log"
    with open(log, "wb") as out:
        head = subprocess.Popen(cmd, cwd=temp, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: "Ray runtime started" in log.read_text(errors="replace"), 180, "ray start", log, head)
        yield f"127.0.0.1:{port}", temp
    finally:
        _stop(head)
        _kill_leftovers(str(temp))
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.e2e
@pytest.mark.needs("ray")
def test_ray_sweep_runs_every_job_on_the_ray_cluster_as_a_child_run(ray_cluster, tiny_dataset, tmp_path):
    address, temp = ray_cluster
    result = _sweep(tmp_path, "hydra/launcher=ray", f"hydra.launcher.ray.init.address={address}",
                    f"hydra.launcher.ray.remote.num_cpus={GIVEN_THREADS}", "model=cnn,cnn_strided",
                    *tiny_overrides(tiny_dataset, tmp_path), "runtime.num_threads=auto")  # what the launcher gives
    assert "Connecting to existing Ray cluster" in result.stdout + result.stderr  # not a Ray of its own
    parent, children = _sweep_runs("RayLauncher")
    assert sorted(c.info.run_name for c in children) == ["cnn", "cnn_strided"]
    assert all(c.info.status == "FINISHED" for c in children)
    # Each job trained in a worker of this cluster: the worker's log, named after its pid, holds the job's run id.
    logs = temp / "session_latest" / "logs"
    for child in children:
        worker_logs = list(logs.glob(f"worker-*-{_pid(child)}.out")) + list(logs.glob(f"worker-*-{_pid(child)}.err"))
        assert any(f"MLflow run {child.info.run_id}" in p.read_text(errors="replace") for p in worker_logs), child
        assert child.data.tags[keys.THREADS] == str(GIVEN_THREADS)  # Ray's num_cpus, which `auto` cannot reach
    # The workers started in the temp dir; the jobs worked in the sweep's folder (ray_worker_setup).
    assert len(list(tmp_path.glob("outputs/sweeps/*/*/*_cnn*/models/model.ckpt"))) == 2
    assert not (temp / "outputs").exists()


# --- submitit, local executor --------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.needs("submitit")
def test_submitit_local_sweep_nests_jobs_and_records_a_failing_one(tiny_dataset, tmp_path):
    sweep_dir = tmp_path / "sweep"
    _sweep(tmp_path, "hydra/launcher=submitit_local", "model=cnn", "optimizer.lr=0.001,-1",
           f"hydra.sweep.dir={sweep_dir}", *tiny_overrides(tiny_dataset, tmp_path))
    parent, children = _sweep_runs("LocalLauncher")
    assert len(children) == 2
    (ok,) = [c for c in children if c.info.status == "FINISHED"]
    (failed,) = [c for c in children if c.info.status == "FAILED"]
    assert "optimizer.lr" in failed.data.tags[keys.ERROR]
    assert parent.data.tags[keys.FAILED_CHILDREN] == "1"
    # submitit's job folders: the pickled job, its result, and the log of the process that trained.
    folders = list(_job_folders(sweep_dir).values())
    assert len(folders) == 2 and all(list(f.glob("*_submitted.pkl")) for f in folders)
    logs = [p.read_text(errors="replace") for f in folders for p in f.glob("*_log.*")]
    assert any(f"MLflow run {ok.info.run_id}" in text for text in logs)
    assert _pid(ok) != os.getpid()


# --- SLURM ---------------------------------------------------------------------------------------

SLURM_BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol", "scancel")


@pytest.fixture
def slurm_cluster():
    """A one-node SLURM cluster (munged, slurmctld, slurmd from Debian's slurm-wlm) on 127.0.0.1, every
    file in a temp dir and every port chosen free; yields the environment that points SLURM's commands
    at it (SLURM_CONF). The node declares 2 * GIVEN_THREADS CPUs, so two jobs of GIVEN_THREADS fit."""
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None]
    if missing:
        pytest.skip(f"SLURM is not installed (apt-get install slurmctld slurmd slurm-client munge): no {missing}")
    if os.geteuid() != 0:
        pytest.skip("slurmd runs jobs as their user, which needs root")
    temp = Path(tempfile.mkdtemp(prefix="slurm", dir="/tmp"))
    for sub in ("state", "spool", "munge"):
        (temp / sub).mkdir()
    (temp / "munge").chmod(0o700)
    key, sock = temp / "munge" / "munge.key", temp / "munge" / "munge.sock"
    subprocess.run(["mungekey", "--create", f"--keyfile={key}", "--bits=1024"], check=True)
    ctld_port, d_port = _free_ports(2)
    conf = temp / "slurm.conf"
    conf.write_text(f"""\
ClusterName=cnnlabtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={temp}/state
SlurmdSpoolDir={temp}/spool
SlurmctldPidFile={temp}/slurmctld.pid
SlurmdPidFile={temp}/slurmd.pid
SlurmctldLogFile={temp}/slurmctld.log
SlurmdLogFile={temp}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=3600
NodeName=localhost NodeAddr=127.0.0.1 CPUs={2 * GIVEN_THREADS} RealMemory=4000 State=UNKNOWN
PartitionName=cnnlab Nodes=localhost Default=YES MaxTime=30 State=UP
""")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs: list[subprocess.Popen] = []

    def start(name: str, *cmd: str) -> subprocess.Popen:
        with open(temp / f"{name}.out", "wb") as out:
            proc = subprocess.Popen(cmd, cwd=temp, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        procs.append(proc)
        return proc

    try:
        munged = start("munged", "munged", "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
                       f"--pid-file={temp}/munge/munged.pid", f"--log-file={temp}/munge/munged.log",
                       f"--seed-file={temp}/munge/seed")
        _wait_for(sock.exists, 60, "munged", temp / "munged.out", munged)
        ctld = start("slurmctld", "slurmctld", "-D", "-i", "-f", str(conf))
        start("slurmd", "slurmd", "-D", "-N", "localhost", "-f", str(conf))

        def idle() -> bool:
            state = subprocess.run(["sinfo", "-h", "-o", "%t", "-p", "cnnlab"], env=env, capture_output=True, text=True)
            return state.stdout.strip() == "idle"

        _wait_for(idle, 120, "slurm node", temp / "slurmctld.log", ctld)
        yield env
    finally:
        subprocess.run(["scancel", "--partition=cnnlab"], env=env, capture_output=True)
        for proc in reversed(procs):
            _stop(proc)
        _kill_leftovers(str(temp))
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.e2e
@pytest.mark.needs("slurm", "submitit")
def test_slurm_sweep_runs_every_job_as_a_slurm_job_and_child_run(slurm_cluster, tiny_dataset, tmp_path):
    sweep_dir = tmp_path / "sweep"
    _sweep(tmp_path, "hydra/launcher=slurm", "hydra.launcher.partition=cnnlab", "hydra.launcher.timeout_min=10",
           f"hydra.launcher.cpus_per_task={GIVEN_THREADS}", "hydra.launcher.mem_gb=1", "model=cnn,cnn_strided",
           f"hydra.sweep.dir={sweep_dir}", *tiny_overrides(tiny_dataset, tmp_path), "runtime.num_threads=auto",
           env=slurm_cluster)
    parent, children = _sweep_runs("SlurmLauncher")
    assert sorted(c.info.run_name for c in children) == ["cnn", "cnn_strided"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert all(c.data.tags[keys.THREADS] == str(GIVEN_THREADS) for c in children)  # --cpus-per-task
    # slurmctld ran both (array tasks, COMPLETED); each one's submitit folder holds the log of its training.
    # submitit returns once a job's result is written, which can be before slurmd has reported the job's
    # end (it stays COMPLETING for a moment on a loaded machine), so wait for slurmctld's record.
    def completed(shown: str) -> set[str]:
        return {f"{m['array']}_{m['task']}" for m in re.finditer(
            r"ArrayJobId=(?P<array>\d+) ArrayTaskId=(?P<task>\d+) .*?JobState=COMPLETED", shown)}

    deadline = time.monotonic() + 120
    while True:
        shown = subprocess.run(["scontrol", "-o", "show", "job"], env=slurm_cluster, capture_output=True,
                               text=True, check=True).stdout
        if len(completed(shown)) == 2 or time.monotonic() > deadline:
            break
        time.sleep(1)
    folders = _job_folders(sweep_dir)
    assert len(completed(shown)) == 2 and set(folders) == completed(shown), (shown, sorted(folders))
    for child in children:
        assert any(f"MLflow run {child.info.run_id}" in p.read_text(errors="replace")
                   for folder in folders.values() for p in folder.glob("*_log.*")), child
