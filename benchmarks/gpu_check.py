"""The one-command GPU check: what a CUDA machine must show before cnnlab is called GPU-ready.

    python benchmarks/gpu_check.py [--data-dir data] [--out outputs/gpu-check] [--steps env,tests,...] [--dry-run]
    make gpu-check                                       # the same, with GPU_CHECK_ARGS passed on

Each step runs as its own process from the repository root, with a timeout, its output kept in
<out>/<nn>-<step>.log; what it must show is written next to it below (STEPS) and judged from its
exit status, its log and the files it writes. The steps follow the GPU-readiness review of
2026-12-01 ("Proposed one-command GPU check"): the GPU and its libraries; the GPU tests
(CNNLAB_REQUIRE_GPU=1 pytest -m gpu: none may skip); host syncs per training step in bf16-mixed and
16-mixed (benchmarks/gpu_audit.py); a 2-epoch Fashion-MNIST training tracked in a SQLite store, then
evaluated on the CPU; 16-mixed against fp32; a training stopped by SIGTERM mid-run and resumed; DDP
over NCCL on one GPU; speed (benchmarks/speed.py: cnnlab against the plain loop on this GPU, float16,
the NaN guard's cost, the plain loop under torch.compile(mode="reduce-overhead")). A table of every
step (PASS, FAIL, SKIP when a step it needs did not run to its end, SYNTHETIC for the data step's
fallback) with what was measured is printed at the end and written to <out>/gpu-check.md (and
.json). `--steps a,b` runs some of them.

Data: Fashion-MNIST in <data-dir>/fashion_mnist/, fetched and verified as `cnnlab fetch` does
(conf/data/fashion_mnist.yaml: /usr/share/datasets/fashion-mnist first, from Debian's
dataset-fashion-mnist package, then the HTTPS mirrors). Where it cannot be had (a GPU machine
without network), the check says how to get it and goes on with a synthetic 60,000/10,000-image set
written by the tests' dataset helper (tests/conftest.py): every step still runs, speed figures hold,
the accuracy range says "n/a (synthetic data)".

Exit status: 0 every step passed; 1 a step failed (or could not run); 3 nothing was checked: a
dry run (--dry-run), or torch finds no CUDA GPU here (then the plan is printed, as for --dry-run,
and the last line is "no CUDA: nothing was checked"); 2 bad arguments.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
NOT_CHECKED = 3
CPU_STEPS_PER_S = 223  # cnnlab's default on this project's 2-core CPU (README, Speed): the GPU must beat it 5x
SYNC_WINDOW = (100, 300)  # training batches SyncAudit watches: inside one epoch of trainer.limit_train_batches=400
NAN_GUARD_EVERY = 50      # conf/callbacks/nan_guard.yaml: one host read per this many steps
SPEED_VARIANTS = ("plain-bf16cl-malloc,cnnlab-default,plain-fp32,cnnlab-fp32,cnnlab-default-no-nan-guard,"
                  "plain-bf16cl-compile,plain-fp16cl-malloc,cnnlab-fp16cl")


@dataclass
class Context:
    data_dir: Path
    out: Path
    data: str = "fashion_mnist"  # or "synthetic", once the data step has run
    outcomes: dict = field(default_factory=dict)  # step name -> Outcome

    @property
    def synthetic(self) -> bool:
        return self.data == "synthetic"

    @property
    def synthetic_idx(self) -> Path:
        return self.out / "synthetic-idx"

    def data_overrides(self) -> list[str]:
        if self.synthetic:
            return ["data=custom", f"data.path={self.synthetic_idx}", f"paths.data_dir={self.out / 'data'}"]
        return ["data=fashion_mnist", f"paths.data_dir={self.data_dir}"]

    def run_dir(self, step: str) -> Path:
        return self.out / "runs" / step

    def train_json(self, step: str) -> dict | None:
        path = self.run_dir(step) / "metrics" / "train.json"
        return json.loads(path.read_text()) if path.is_file() else None

    @property
    def store(self) -> str:
        return f"sqlite:///{self.out / 'mlflow.db'}"


@dataclass
class Outcome:
    status: str            # PASS | FAIL | SKIP | SYNTHETIC
    measured: str
    returncode: int | None = None
    seconds: float = 0.0
    log: Path | None = None
    data: dict = field(default_factory=dict)  # what later steps read (e.g. test accuracy)


@dataclass
class Step:
    name: str
    what: str
    command: Callable[[Context], list[str]]
    expected: str
    judge: Callable[[Context, int, str], tuple[bool, str, dict]]  # (exit status, log) -> passed, measured, data
    timeout_s: int
    env: dict = field(default_factory=dict)
    needs: tuple[str, ...] = ()  # steps that must have run and exited as they should (ok_exit) before this one
    ok_exit: int = 0
    # SIGTERM the process once this file exists, as `timeout -s TERM` would at that moment
    term_when: Callable[[Context], Path] | None = None
    fresh: str | None = None  # a folder under --out removed first: an earlier check's files are not this one's


def train(ctx: Context, step: str, *overrides: str, logger: bool = False) -> list[str]:
    tracking = ([f"tracking.uri={ctx.store}", "tracking.experiment_name=gpu-check"] if logger else ["logger=none"])
    return [PY, "-m", "cnnlab.train", *ctx.data_overrides(), *overrides, *tracking,
            f"hydra.run.dir={ctx.run_dir(step)}"]


# --- judges: (context, exit status, log text) -> (passed, measured, data for later steps) ----------------

def last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return {}


def exited(code: int, log: str) -> str:
    errors = [line for line in log.splitlines() if line.startswith(("error:", "Traceback"))]
    return f"exit {code}" + (f": {errors[-1][:160]}" if errors else "")


def judge_env(ctx, code, log):
    env = last_json(log)
    if not env:
        return False, exited(code, log), {}
    if not env.get("cuda"):
        return False, f"torch {env.get('torch')} (CUDA {env.get('cuda_version')}) finds no CUDA GPU", env
    ok = bool(env.get("cuda") and env.get("bf16_native") and env.get("pynvml"))
    measured = (f"{env.get('name')} (sm_{env.get('capability')}), torch {env.get('torch')}, "
                f"CUDA {env.get('cuda_version')}; bf16 native {'yes' if env.get('bf16_native') else 'NO'}; pynvml "
                f"{'imports' if env.get('pynvml') else 'MISSING (pip install -e .[gpu])'}")
    return ok, measured, env


def judge_data(ctx, code, log):
    found = last_json(log)
    if code or not found:
        return False, exited(code, log), {}
    ctx.data = found["data"]
    if ctx.synthetic:
        return True, (f"Fashion-MNIST not available ({found.get('why', '')[:200]}); get it with `cnnlab params "
                      f"data=fashion_mnist && cnnlab fetch` where there is network, or `apt-get install "
                      f"dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist), or copy a fetched "
                      f"data/fashion_mnist/ and pass --data-dir. Using a SYNTHETIC 60k/10k set: speed only, "
                      f"accuracy not meaningful"), found
    return True, f"fashion_mnist verified in {ctx.data_dir / 'fashion_mnist'} (checksum {found.get('checksum')})", found


def judge_tests(ctx, code, log):
    summary = next((line for line in reversed(log.splitlines()) if re.search(r"\d+ (passed|failed|error)", line)), "")
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", summary)}
    ok = code == 0 and counts.get("passed", 0) > 0 and not counts.get("skipped") and not counts.get("failed")
    return ok, summary.strip("= ") or exited(code, log), counts


def judge_syncs(ctx, code, log, step):
    metrics = ctx.train_json(step)
    if code or metrics is None:
        return False, exited(code, log), {}
    syncs, steps = metrics.get("perf/syncs"), metrics.get("perf/sync_audit_steps")
    if syncs is None or not steps:
        return False, "no perf/syncs in train.json (did SyncAudit run on CUDA?)", {}
    allowed = int(steps) // NAN_GUARD_EVERY  # the NaN guard's reads in the window, none per step
    where = re.findall(r"^\s+(\d+)\s+(\S+:\d+)\s*$", log, flags=re.M)[:3]
    measured = (f"{syncs:.0f} syncs in {steps:.0f} steps ({syncs / steps:.3f} per step; at most {allowed} allowed)"
                + (f"; from {', '.join(f'{w} x{n}' for n, w in where)}" if where else ""))
    return syncs <= allowed, measured, {"syncs": syncs, "steps": steps}


def _in(value, low, high) -> bool:
    return value is not None and low <= value <= high


def judge_e2e(ctx, code, log):
    metrics = ctx.train_json("e2e")
    if code or metrics is None:
        return False, exited(code, log), {}
    checks, parts = [], []
    acc = metrics.get("test/acc")
    device_mb = metrics.get("perf/peak_device_memory_mb")
    b1, b256 = metrics.get("perf/latency_ms_per_image_b1"), metrics.get("perf/latency_ms_per_image_b256")
    checks.append(metrics.get("device") == "cuda:0")
    parts.append(f"device {metrics.get('device')}")
    if ctx.synthetic:
        parts.append(f"test/acc {acc} (n/a: synthetic data)")
    else:
        checks.append(_in(acc, 0.87, 0.91))
        parts.append(f"test/acc {acc:.4f}" if acc is not None else "no test/acc")
    checks.append(_in(device_mb, 250, 600))
    parts.append(f"peak device {device_mb} MB")
    checks.append(_in(b1, 0, 0.5) and _in(b256, 0, 0.01))
    parts.append(f"latency b1 {b1:.3g} ms, b256 {b256:.3g} ms per image" if b1 and b256 else "no latency")
    try:
        from mlflow.tracking import MlflowClient

        run = MlflowClient(ctx.store).get_run(metrics["mlflow_run_id"])
        gpu_metrics = sorted(k for k in run.data.metrics if k.startswith("system/gpu_0"))
        tags = run.data.tags
        used = {k: tags.get(k) for k in ("accelerator", "optimizer_fused", "cudnn_benchmark", "tf32", "num_devices",
                                         "precision")}
        checks.append(bool(gpu_metrics))
        checks.append(str(used["accelerator"]) == "cuda" and str(used["optimizer_fused"]).lower() == "true"
                      and str(used["cudnn_benchmark"]).lower() == "true" and str(used["tf32"]).lower() == "false"
                      and str(used["num_devices"]) == "1")
        parts.append(f"{len(gpu_metrics)} system/gpu_0_* metrics")
        parts.append("tags " + ", ".join(f"{k}={v}" for k, v in used.items()))
    except Exception as exc:  # the store or the run: say so, fail
        checks.append(False)
        parts.append(f"MLflow run not read: {exc}")
    return all(checks), "; ".join(parts), {"test_acc": acc}


def judge_evaluate(ctx, code, log):
    path = ctx.run_dir("e2e") / "metrics" / "eval.json"
    trained = ctx.outcomes.get("e2e")
    if code or not path.is_file() or trained is None:
        return False, exited(code, log), {}
    found = json.loads(path.read_text())
    acc = trained.data.get("test_acc")
    cpu_acc = 1 - found["misclassified"] / found["test_size"]
    f1 = found["macro_f1"]
    ok = acc is not None and abs(f1 - acc) <= 0.01 and abs(cpu_acc - acc) <= 0.005
    return ok, f"CPU: macro F1 {f1:.4f}, accuracy {cpu_acc:.4f}; GPU test/acc {acc}", found


def judge_precision(ctx, code, log, step):
    metrics = ctx.train_json(step)
    if code or metrics is None:
        return False, exited(code, log), {}
    acc = metrics.get("test/acc")
    ok, measured = metrics.get("device") == "cuda:0", f"{metrics.get('device')}, test/acc {acc}"
    other = ctx.outcomes.get("precision-16-mixed") if step == "precision-32" else None
    if other is not None and other.data.get("test_acc") is not None and acc is not None:
        gap = abs(acc - other.data["test_acc"])
        ok = ok and gap <= 0.015
        measured += f"; {100 * gap:.2f} points from 16-mixed" + (" (synthetic data)" if ctx.synthetic else "")
    return ok, measured, {"test_acc": acc}


def judge_stop(ctx, code, log):
    line = next((x for x in log.splitlines() if x.startswith("error: interrupted by SIGTERM")), "")
    if code == 0:
        return False, "finished before the stop: nothing to resume (a faster GPU than expected?)", {}
    return code == 128 + signal.SIGTERM and "checkpoint" in line, f"exit {code}: {line[:160]}", {}


def judge_resume(ctx, code, log):
    curves = ctx.run_dir("resume") / "metrics" / "curves.csv"
    epochs = [int(r["epoch"]) for r in csv.DictReader(curves.open())] if curves.is_file() else []
    resumed = "resuming from" in log
    ok = code == 0 and resumed and epochs == [1, 2]
    return ok, f"exit {code}; {'resumed' if resumed else 'did NOT resume'}; curve epochs {epochs}", {}


def judge_nccl(ctx, code, log):
    backend = re.search(r"distributed_backend=(\w+)", log)
    found = backend.group(1) if backend else None
    return code == 0 and found == "nccl", f"exit {code}; distributed_backend={found}", {}


def judge_speed(ctx, code, log):
    path = ctx.out / "speed" / "speed.json"
    if code or not path.is_file():
        return False, exited(code, log), {}
    med = json.loads(path.read_text())["medians"]

    def steps(name):
        return 1000 / med[name]["ms_per_step"] if name in med else None

    plain, tracked = steps("plain-bf16cl-malloc"), steps("cnnlab-default")
    parts = [f"plain bf16 {plain:,.0f} steps/s" if plain else "plain bf16 missing",
             f"cnnlab {tracked:,.0f} ({tracked / plain:.2f}x plain)" if tracked and plain else "cnnlab missing"]
    unguarded, compiled = steps("cnnlab-default-no-nan-guard"), steps("plain-bf16cl-compile")
    if unguarded and tracked:
        parts.append(f"NaN guard costs {100 * (1 - tracked / unguarded):.1f}%")
    if compiled and plain:
        parts.append(f"compiled plain {compiled:,.0f} ({compiled / plain:.2f}x: "
                     f"{'a runtime.compile would pay' if compiled >= 1.5 * plain else 'no runtime.compile'})")
    if steps("cnnlab-fp16cl") and steps("plain-fp16cl-malloc"):
        parts.append(f"fp16: cnnlab {steps('cnnlab-fp16cl'):,.0f}, plain {steps('plain-fp16cl-malloc'):,.0f}")
    floor = 5 * CPU_STEPS_PER_S
    ok = bool(plain and tracked and plain >= floor and tracked >= floor)
    return ok, "; ".join(parts), {k: 1000 / v["ms_per_step"] for k, v in med.items()}


# --- the steps ---------------------------------------------------------------------------------------

SYNC_AUDIT = ["+callbacks.sync_audit._target_=gpu_audit.SyncAudit",
              f"+callbacks.sync_audit.first_batch={SYNC_WINDOW[0]}",
              f"+callbacks.sync_audit.last_batch={SYNC_WINDOW[1]}"]
AUDITED = SYNC_WINDOW[1] - SYNC_WINDOW[0]


def sync_step(precision: str, before: str) -> Step:
    name = f"syncs-{precision}"
    return Step(
        name, f"host syncs per training step, {precision} (benchmarks/gpu_audit.py)",
        lambda ctx: train(ctx, name, f"trainer.precision={precision}", "trainer.max_epochs=1",
                          "trainer.limit_train_batches=400", "~callbacks.model_profile", "~callbacks.mlflow_model",
                          *SYNC_AUDIT),
        f"perf/syncs <= {AUDITED // NAN_GUARD_EVERY} over batches {SYNC_WINDOW[0]}-{SYNC_WINDOW[1] - 1}: only the NaN "
        f"guard's reads, one per {NAN_GUARD_EVERY} steps (ends of batches 149, 199, 249, 299); 0 per step. Before "
        f"review fixes 1-2: {before}",
        lambda ctx, code, log: judge_syncs(ctx, code, log, name), 600, env={"PYTHONPATH": "benchmarks"},
        fresh=f"runs/{name}")


STEPS = [
    Step("env", "the GPU, bf16, pynvml", lambda ctx: [PY, str(HERE / "gpu_check.py"), "--report-env"],
         "CUDA available, the GPU named, bf16 native (is_bf16_supported(including_emulation=False): Ampere on), "
         "`import pynvml` works (pip install -e '.[gpu]'); never skipped", judge_env, 120),
    Step("data", "Fashion-MNIST, else a synthetic set",
         lambda ctx: [PY, str(HERE / "gpu_check.py"), "--prepare-data", "--data-dir", str(ctx.data_dir),
                      "--out", str(ctx.out)],
         "fashion_mnist verified in --data-dir (fetched as `cnnlab fetch` does); else how to get it, and a "
         "synthetic 60k/10k set (speed only: accuracy not meaningful)", judge_data, 900),
    Step("tests", "the GPU tests, none skipped",
         lambda ctx: [PY, "-m", "pytest", "-m", "gpu", "-rs", "-q", "-p", "no:cacheprovider", "tests"],
         "all pass, 0 skipped (CNNLAB_REQUIRE_GPU=1: a missing GPU fails them)", judge_tests, 1800,
         env={"CNNLAB_REQUIRE_GPU": "1"}),
    sync_step("bf16-mixed", before=f"{AUDITED} (the NaN guard's read, every step)"),
    sync_step("16-mixed", before=f"{2 * AUDITED} (the NaN guard's read and the grad scaler's, every step)"),
    Step("e2e", "2 epochs, tracked in a SQLite store",
         lambda ctx: train(ctx, "e2e", "trainer.max_epochs=2", "tracking.system_metrics_interval_s=1", logger=True),
         "exit 0; train.json: device cuda:0, test/acc 0.87-0.91 (the CPU's bf16: 0.8922, README Speed), "
         "perf/peak_device_memory_mb 250-600 (the data alone is 219 MB), latency <= 0.5 ms/image at batch 1 "
         "and < 0.01 at 256; system/gpu_0_* metrics logged; tags accelerator=cuda, optimizer_fused=True, "
         "cudnn_benchmark=True, tf32=False, num_devices=1", judge_e2e, 900, fresh="runs/e2e"),
    Step("evaluate", "the e2e checkpoint evaluated on the CPU",
         lambda ctx: [PY, "-m", "cnnlab.evaluate", "--checkpoint", str(ctx.run_dir("e2e") / "models" / "model.ckpt"),
                      "--output-dir", str(ctx.run_dir("e2e"))],  # the data: where the checkpoint says it trained
         "exit 0; macro F1 within 0.01 of the GPU's test/acc, the CPU's accuracy within 0.005 of it",
         judge_evaluate, 600, env={"CUDA_VISIBLE_DEVICES": ""}, needs=("e2e",)),
    Step("precision-16-mixed", "1 epoch in float16 (fused Adam, grad scaler)",
         lambda ctx: train(ctx, "precision-16-mixed", "trainer.max_epochs=1", "trainer.precision=16-mixed"),
         "exit 0 on cuda:0", lambda ctx, code, log: judge_precision(ctx, code, log, "precision-16-mixed"), 600,
         fresh="runs/precision-16-mixed"),
    Step("precision-32", "1 epoch in fp32, default layout",
         lambda ctx: train(ctx, "precision-32", "trainer.max_epochs=1", "trainer.precision=32",
                           "runtime.channels_last=false"),
         "exit 0 on cuda:0; test/acc within 1.5 points of 16-mixed's",
         lambda ctx, code, log: judge_precision(ctx, code, log, "precision-32"), 600, fresh="runs/precision-32"),
    Step("resume-stop", "SIGTERM mid-run",
         lambda ctx: train(ctx, "resume", "trainer.max_epochs=2", "callbacks.resume_checkpoint.every_n_train_steps=500",
                           logger=True),
         "SIGTERM once models/last.ckpt exists (step 500): exit 143, `error: interrupted by SIGTERM: checkpoint ...`",
         judge_stop, 600, term_when=lambda ctx: ctx.run_dir("resume") / "models" / "last.ckpt", fresh="runs/resume",
         ok_exit=128 + signal.SIGTERM),
    Step("resume", "the same command again",
         lambda ctx: train(ctx, "resume", "trainer.max_epochs=2", "callbacks.resume_checkpoint.every_n_train_steps=500",
                           logger=True),
         "exit 0, `resuming from` in the log, curves.csv has epochs 1 and 2", judge_resume, 600,
         needs=("resume-stop",)),
    Step("nccl", "DDP over NCCL, one GPU",
         lambda ctx: train(ctx, "nccl", "trainer=ddp", "trainer.devices=1", "trainer.max_epochs=1"),
         "exit 0, the log says distributed_backend=nccl (two ranks need two GPUs: NCCL refuses two on one)",
         judge_nccl, 600, fresh="runs/nccl"),
    Step("speed", "cnnlab against the plain loop on this GPU (benchmarks/speed.py)",
         lambda ctx: [PY, str(HERE / "speed.py"), "--epochs", "2", "--rounds", "1", "--variants", SPEED_VARIANTS,
                      "--out", str(ctx.out / "speed"),
                      *(["--data", "custom", "--data-path", str(ctx.synthetic_idx), "--data-dir", str(ctx.out / "data")]
                        if ctx.synthetic else ["--data", "fashion_mnist", "--data-dir", str(ctx.data_dir)])],
         f"plain bf16 and cnnlab both >= {5 * CPU_STEPS_PER_S:,} steps/s (5x the CPU's {CPU_STEPS_PER_S}). "
         "Estimates to replace: plain bf16 1,500-2,500 steps/s, cnnlab 500-1,200 (0.3-0.6x), NaN guard 2-10%; "
         "a runtime.compile option pays if the compiled plain loop gains >= 1.5x", judge_speed, 1800, fresh="speed"),
]


def shown(argv: list[str], env: dict) -> str:
    def short(arg: str) -> str:
        return "python" if arg == PY else arg.replace(str(ROOT) + os.sep, "")
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), *(shlex.quote(short(a)) for a in argv)])


def describe(step: Step, index: int, ctx: Context) -> str:
    stop = "timeout -s TERM <once models/last.ckpt exists> " if step.term_when else ""
    return (f"{index:2d}. {step.name}: {step.what}\n"
            f"    $ {stop}{shown(step.command(ctx), step.env)}\n"
            f"    timeout {step.timeout_s} s; expected: {step.expected}")


# --- running -----------------------------------------------------------------------------------------

def run_step(step: Step, index: int, ctx: Context) -> Outcome:
    by_name = {s.name: s for s in STEPS}
    missing = [n for n in step.needs
               if ctx.outcomes.get(n) is None or ctx.outcomes[n].returncode != by_name[n].ok_exit]
    if missing:
        return Outcome("SKIP", f"needs {', '.join(missing)}, which did not run to its end")
    log_path = ctx.out / f"{index:02d}-{step.name}.log"
    argv = step.command(ctx)
    env = {**os.environ, **step.env}
    if "PYTHONPATH" in step.env and os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = f"{step.env['PYTHONPATH']}{os.pathsep}{os.environ['PYTHONPATH']}"
    if step.fresh:
        shutil.rmtree(ctx.out / step.fresh, ignore_errors=True)
    print(f"[{index:2d}] {step.name}: {shown(argv, step.env)}", flush=True)
    began = time.monotonic()
    with open(log_path, "w") as log:
        log.write(f"$ {shown(argv, step.env)}\n\n")
        log.flush()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            code = wait(proc, step, ctx, began)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return Outcome("FAIL", f"timed out after {step.timeout_s} s (log {log_path})", None,
                           time.monotonic() - began, log_path)
    text = log_path.read_text(errors="replace")
    try:
        passed, measured, data = step.judge(ctx, code, text)
    except Exception as exc:  # a judge that cannot read what the step wrote: the step failed
        passed, measured, data = False, f"exit {code}; could not judge: {type(exc).__name__}: {exc}", {}
    status = "PASS" if passed else "FAIL"
    if step.name == "data" and passed and ctx.synthetic:
        status = "SYNTHETIC"
    return Outcome(status, measured, code, time.monotonic() - began, log_path, data)


def wait(proc: subprocess.Popen, step: Step, ctx: Context, began: float) -> int:
    deadline = began + step.timeout_s
    marker = step.term_when(ctx) if step.term_when else None
    while proc.poll() is None:
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(proc.args, step.timeout_s)
        if marker is not None and marker.is_file():
            proc.send_signal(signal.SIGTERM)  # the training process only: it saves, reports, exits 143
            marker = None
        time.sleep(0.05)
    return proc.returncode


def report(ctx: Context, steps: list[Step], exit_status: int) -> str:
    lines = [f"# GPU check ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"Data: {'SYNTHETIC (accuracy not meaningful)' if ctx.synthetic else 'Fashion-MNIST'}; "
             f"logs in {ctx.out}. Exit status {exit_status}.", "",
             "| # | step | status | measured | expected | s |", "| ---: | --- | --- | --- | --- | ---: |"]
    for index, step in enumerate(steps):
        outcome = ctx.outcomes[step.name]
        cell = outcome.measured.replace("|", "/").replace("\n", " ")
        lines.append(f"| {index} | {step.name} | {outcome.status} | {cell} | {step.expected.replace('|', '/')} | "
                     f"{outcome.seconds:.0f} |")
    return "\n".join(lines) + "\n"


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# --- the helpers the first two steps run (their own processes) ---------------------------------------

def report_env() -> int:
    import importlib.util

    import torch

    cuda = torch.cuda.is_available()
    env = {"cuda": cuda, "torch": torch.__version__, "cuda_version": torch.version.cuda,
           "pynvml": importlib.util.find_spec("pynvml") is not None}
    if cuda:
        major, minor = torch.cuda.get_device_capability(0)
        env.update(name=torch.cuda.get_device_name(0), capability=f"{major}{minor}", devices=torch.cuda.device_count(),
                   bf16_native=torch.cuda.is_bf16_supported(including_emulation=False))
    if env["pynvml"]:
        import pynvml

        try:
            pynvml.nvmlInit()
            env["nvml_devices"] = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as exc:
            env["pynvml"], env["nvml_error"] = False, str(exc)
    print(json.dumps(env))
    return 0 if cuda else 1


def prepare_data(data_dir: Path, out: Path) -> int:
    """Fashion-MNIST into data_dir, verified; else a synthetic set (tests/conftest.py's helper) as data=custom."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from cnnlab.core.config import CONF_DIR
    from cnnlab.core.errors import CnnlabError, one_line
    from cnnlab.training.fetch import fetch_dataset

    def spec(*overrides: str) -> dict:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return OmegaConf.to_container(compose("config", overrides=list(overrides)).data, resolve=True)

    try:
        manifest = fetch_dataset(spec("data=fashion_mnist"), data_dir, timeout=10)
        print(json.dumps({"data": "fashion_mnist", "checksum": manifest["checksum"]}))
        return 0
    except CnnlabError as exc:
        why = one_line(exc)
    print(f"Fashion-MNIST is not available: {why}\nwriting a synthetic 60,000/10,000-image set", flush=True)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import write_dataset

    source = out / "synthetic-idx"
    write_dataset(source, n_train=60_000, n_test=10_000)
    fetch_dataset(spec("data=custom", f"data.path={source}"), out / "data", timeout=10)
    print(json.dumps({"data": "synthetic", "why": why, "path": str(source)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="exit status: 0 passed, 1 a step failed, 3 nothing was checked "
                                            "(--dry-run, or no CUDA GPU here)")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data",
                        help="where datasets are fetched (paths.data_dir; default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu-check",
                        help="logs and report (default: %(default)s)")
    parser.add_argument("--steps", default=None, help=f"comma-separated, from: {', '.join(s.name for s in STEPS)}")
    parser.add_argument("--dry-run", action="store_true", help="print every step, its command and what it must show")
    parser.add_argument("--report-env", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prepare-data", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.data_dir, args.out = args.data_dir.resolve(), args.out.resolve()
    if args.report_env:
        return report_env()
    if args.prepare_data:
        return prepare_data(args.data_dir, args.out)

    steps = STEPS
    if args.steps:
        names = [n.strip() for n in args.steps.split(",") if n.strip()]
        unknown = [n for n in names if n not in {s.name for s in STEPS}]
        if unknown:
            parser.error(f"unknown steps {unknown}; choose from {[s.name for s in STEPS]}")
        # the steps that train read the data step's choice
        trains = any(n not in ("env", "tests") for n in names)
        steps = [s for s in STEPS if s.name in names or (s.name == "data" and trains)]
    ctx = Context(args.data_dir, args.out)
    no_cuda = not args.dry_run and not cuda_available()
    if args.dry_run or no_cuda:
        print(f"GPU check: {len(steps)} steps, from {ROOT}; logs would go to {args.out}\n")
        for index, step in enumerate(steps):
            print(describe(step, index, ctx) + "\n")
        print("Without Fashion-MNIST the steps after `data` train on a synthetic set (data=custom) instead.")
        print("no CUDA: nothing was checked" if no_cuda else "dry run: nothing was checked")
        return NOT_CHECKED

    args.out.mkdir(parents=True, exist_ok=True)
    for index, step in enumerate(steps):
        ctx.outcomes[step.name] = outcome = run_step(step, index, ctx)
        print(f"[{index:2d}] {step.name}: {outcome.status}: {outcome.measured}", flush=True)
    exit_status = 1 if any(o.status in ("FAIL", "SKIP") for o in ctx.outcomes.values()) else 0
    text = report(ctx, steps, exit_status)
    (args.out / "gpu-check.md").write_text(text)
    (args.out / "gpu-check.json").write_text(json.dumps(
        {name: {"status": o.status, "measured": o.measured, "exit": o.returncode, "seconds": round(o.seconds, 1),
                "log": str(o.log) if o.log else None} for name, o in ctx.outcomes.items()}, indent=2) + "\n")
    print("\n" + text)
    return exit_status


if __name__ == "__main__":
    sys.exit(main())
