"""One fast test per private part of torch, Lightning, Hydra and MLflow that cnnlab relies on
(src/cnnlab/core/internals.py lists them): an upgrade that changes one fails here, by name."""

from __future__ import annotations

import http.server
import os
import re
import subprocess
import sys
import threading

import mlflow
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient
from pytorch_lightning.loggers import MLFlowLogger

from cnnlab.core import internals


def test_onednn_answers_whether_this_cpu_has_bf16_and_follows_onednn_max_cpu_isa():
    assert isinstance(internals.bf16_native_on_cpu(), bool)
    code = "from cnnlab.core.internals import bf16_native_on_cpu; print(bf16_native_on_cpu())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert result.stdout.strip() == "False", result.stderr[-1000:]


class CountsBatches(pl.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(internals.batches_done_this_epoch(trainer))

    def on_train_epoch_end(self, trainer, pl_module):
        self.seen.append(internals.batches_done_this_epoch(trainer))


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(3, 2)), batch_size=1)


def test_lightnings_batch_counter_counts_the_batch_being_ended_and_is_zero_at_the_epochs_end(tmp_path):
    counter = CountsBatches()
    trainer = pl.Trainer(max_epochs=1, callbacks=[counter], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(Tiny())
    assert counter.seen == [1, 2, 0, 0]  # the third batch ends the epoch
    assert internals.batches_done_this_epoch(trainer) == 0 and internals.batches_done_this_epoch(None) == 0


def test_lightnings_mlflow_logger_keeps_the_run_state_cnnlabs_logger_reads(tmp_path):
    logger = MLFlowLogger(experiment_name="internals", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    assert all(hasattr(logger, name) for name in internals.MLFLOW_LOGGER_STATE)
    assert logger._initialized is False
    run_id = logger.run_id  # opens the run
    assert logger._initialized is True and logger._run_id == run_id and logger._experiment_id


def test_lightnings_tqdm_helper_turns_an_unknown_total_into_none():
    assert internals.convert_inf(float("inf")) is None and internals.convert_inf(7) == 7


def test_hydras_basic_sweeper_keeps_what_the_seed_sweeper_extends():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper_class = internals.basic_sweeper()
    sweeper = sweeper_class(max_batch_size=None, params=None)
    assert set(vars(sweeper)) <= {"overrides", "batch_index", "max_batch_size", "params", "hydra_context", "config",
                                  "launcher"}
    overrides = OverridesParser.create().parse_overrides(["a=1,2", "b=x"])
    jobs = [job for batch in sweeper_class.split_arguments(overrides, None) for job in batch]
    assert jobs == [["a=1", "b=x"], ["a=2", "b=x"]]
    assert list(sweeper_class.split_overrides_to_chunks(jobs, 1)) == [[jobs[0]], [jobs[1]]]


def test_mlflow_makes_a_dataset_entity_the_client_can_log(tmp_path):
    dataset = mlflow.data.from_numpy(np.zeros((2, 3)), name="tiny")
    entity = internals.dataset_entity(dataset)
    assert entity.name == "tiny" and entity.digest == dataset.digest
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    run = client.create_run(client.create_experiment("internals"))
    from mlflow.entities import DatasetInput

    client.log_inputs(run.info.run_id, datasets=[DatasetInput(entity, [])])
    assert client.get_run(run.info.run_id).inputs.dataset_inputs[0].dataset.name == "tiny"


def test_mlflows_system_metrics_monitor_starts_for_a_client_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("internals"))
    monitor = internals.system_metrics_monitor(run.info.run_id, 0.2, False, uri)
    monitor.start()
    monitor.finish()
    assert callable(monitor.start) and callable(monitor.finish)


class Fails(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(401)  # what a server with authentication answers without credentials
        self.end_headers()

    def log_message(self, *args):
        pass


def test_mlflows_http_error_text_carries_the_status_code(monkeypatch):
    server = http.server.HTTPServer(("127.0.0.1", 0), Fails)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    try:
        with pytest.raises(Exception) as failure:
            MlflowClient(f"http://127.0.0.1:{server.server_port}").get_experiment("0")
    finally:
        server.shutdown()
    text = " ".join(str(e) for e in (failure.value, failure.value.__cause__, failure.value.__context__) if e)
    assert re.search(internals.HTTP_STATUS_TEXT, text)[1] == "401", text


def test_lightning_params_are_what_lightnings_mlflow_logger_sends(tmp_path):
    from argparse import Namespace

    from pytorch_lightning.loggers import MLFlowLogger

    params = {"model": {"name": "cnn", "blocks": [32, 64]}, "ns": Namespace(lr=0.001), "long": "x" * 300, "none": None}
    logger = MLFlowLogger(experiment_name="internals", tracking_uri=f"sqlite:///{tmp_path / 'p.db'}")
    logger.log_hyperparams(params)
    sent = MlflowClient(logger._tracking_uri).get_run(logger.run_id).data.params
    assert internals.lightning_params(params) == sent
    assert sent["model/name"] == "cnn" and sent["ns/lr"] == "0.001" and len(sent["long"]) == 250
