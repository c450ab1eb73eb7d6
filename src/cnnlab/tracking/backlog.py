"""What a training's store did not take: the writes to one MLflow run kept in order while its store
is away, sent when it answers again, and saved beside the run pointer at the end for `cnnlab sync`
(cnnlab.tracking.sync replays them). Used by the Lightning logger (cnnlab.tracking.logger).
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from mlflow.entities import Metric

from cnnlab.core.errors import one_line
from cnnlab.core.files import write_atomic
from cnnlab.tracking import sync
from cnnlab.tracking.store import failure_kind, failure_reason, single_try

log = logging.getLogger(__name__)
BACKLOG_FILE = sync.BACKLOG_FILE  # beside the run pointer: what a vanished store never received


class Backlog:
    """The writes to one MLflow run that its store did not take, so that a tracking server going
    away mid-training costs no training (MLflowLogger sends every write through one).

    A write the store does not answer (connection refused, no answer within tracking.timeout_s, a
    SQLite file that cannot be opened) waits here, in order, with every write after it. They are
    sent again with the first write at least RETRY_S seconds after the last failure, each tried
    once (no retries) while the store stays away: a dead server costs one timeout per RETRY_S of
    training, not one per step. A write the store answers with an error is not tried again but
    listed. What still waits at the end of the run is written to a JSON file (`save`), metric
    points with their step and timestamp, the files of artifacts and of the model beside it, so
    nothing measured is lost with the server: `cnnlab sync` (cnnlab.tracking.sync) sends it once it is back.
    """

    RETRY_S = 30.0

    def __init__(self, uri: str):
        self.uri = uri
        # (what, for the file; the write; what writes the artifact's files into a folder, to send later)
        self.waiting: list[tuple[dict, Callable[[], Any], Callable[[Path], Any] | None]] = []
        self.refused: list[dict] = []
        self.error = ""          # why the store did not take the last write tried, while it does not
        self._next_try = 0.0     # time.monotonic() before which the store is not asked again
        self._saved: Path | None = None
        self._spooled = 0        # artifacts whose files were kept for `cnnlab sync`

    def send(self, what: dict, write: Callable[[], Any], now: bool = False,
             spool: Callable[[Path], Any] | None = None) -> None:
        """Write now, or after what already waits; `now`: try even if the store failed less than
        RETRY_S ago (the end of a run). `spool(folder)`: writes an artifact's files into `folder`,
        should it still wait when the run ends."""
        self.waiting.append((what, write, spool))
        if now or time.monotonic() >= self._next_try:
            self._flush()

    def _flush(self) -> None:
        away, kept = bool(self.error), []
        while self.waiting:
            what, write, spool = self.waiting.pop(0)
            try:
                with single_try() if away else nullcontext():
                    write()
                continue
            except Exception as exc:
                failure = failure_kind(exc)
                if failure is None:
                    raise  # not the store's doing
                if failure == "refused":
                    self.refused.append({**what, "error": one_line(exc)[:500]})
                    log.warning("tracking store %s refused a write to the run (%s): it is not tried again",
                                self.uri, one_line(exc)[:300])
                    continue
                if not self.error:
                    log.warning("tracking store %s stopped answering (%s): the training goes on; what it does not "
                                "receive waits and is sent again every %.0f s", self.uri, failure_reason(exc),
                                self.RETRY_S)
                self.error, self._next_try, away = failure_reason(exc), time.monotonic() + self.RETRY_S, True
                kept.append((what, write, spool))
                if failure == "down":  # the writes behind it would only wait for their own timeouts
                    break
        self.waiting[:0] = kept
        if not self.waiting and self.error:
            log.warning("tracking store %s answers again: every write that waited is logged", self.uri)
            self.error = ""

    def save(self, path: Path | None, run_id: str | None) -> None:
        """List what the store did not take in `path` (JSON), the files of the artifacts and model
        among it in mlflow_backlog/<run id>/ beside it, with a warning saying how much and where, and
        list it in the project's index of backlogs for `cnnlab sync`; once everything is logged,
        remove what this object wrote."""
        if not (self.waiting or self.refused):
            if self._saved:
                self._saved.unlink(missing_ok=True)
                shutil.rmtree(self._saved.parent / sync.SPOOL_DIR / str(run_id), ignore_errors=True)
                sync.unregister(run_id)
                self._saved = None
            return
        if path and path != self._saved:
            other = sync.load(path)
            if other and other.get("run_id") != run_id and other["not_logged"]:  # an earlier run's, not sent yet
                path = path.with_name(f"{path.stem}-{run_id}{path.suffix}")
        if path:
            self._spool(path.parent, run_id)
        entries = [what for what, *_ in self.waiting] + self.refused
        points, artifacts, other = sync.counts(entries)
        record = {"tracking_uri": self.uri, "run_id": run_id, "error": self.error or None,
                  "not_logged": [what for what, *_ in self.waiting], "refused": self.refused}
        text = json.dumps(record, indent=2, default=str) + "\n"
        if path and path == self._saved and path.is_file() and path.read_text() == text:
            return  # said already (Lightning ends a run twice: after fit and after test)
        if path:
            write_atomic(path, text)
            self._saved = path
            if self.waiting and run_id:
                sync.register(path, run_id)
        log.warning("tracking store %s did not take %d metric points, %d artifacts and %d other writes (params, tags, "
                    "run status) of run %s%s", self.uri, points, artifacts, other, run_id,
                    f": they are listed in {path}" + ("; `cnnlab sync` sends them once it is back (`cnnlab train` and "
                                                       "`cnnlab compare` try first)" if self.waiting else "")
                    if path else "")

    def _spool(self, base: Path, run_id: str | None) -> None:
        """Write the files of each waiting artifact (a figure, a text, the model...) into
        base/mlflow_backlog/<run id>/<n>/, so that they can be sent after this process is gone (and
        a file artifact as it was, whatever the next training writes over it)."""
        for what, _, spool in self.waiting:
            if spool is None or "spooled" in what:
                continue
            self._spooled += 1
            folder = Path(sync.SPOOL_DIR) / str(run_id) / str(self._spooled)
            shutil.rmtree(base / folder, ignore_errors=True)
            try:
                (base / folder).mkdir(parents=True)
                spool(base / folder)
                what["spooled"] = folder.as_posix()
            except Exception as exc:  # the rest of the backlog is still worth keeping
                log.warning("the files of %s are not kept for `cnnlab sync`: %s", what.get("path") or what.get("name"),
                            one_line(exc))

    @staticmethod
    def points(metrics: dict[str, float], step: int) -> tuple[list[Metric], dict]:
        """Metric points stamped now (sent now or later, they keep the time they were measured), and
        their entry for the file (a value that is not a finite number as null, as in train.json)."""
        stamp = int(time.time() * 1000)
        # As Lightning's MLFlowLogger.log_metrics: no text values, and only the characters MLflow allows in keys.
        points = [Metric(re.sub(r"[^a-zA-Z0-9_/. -]+", "", k), float(v), stamp, step)
                  for k, v in metrics.items() if not isinstance(v, str)]
        return points, {"kind": "metrics", "points": [
            {"key": m.key, "value": m.value if math.isfinite(m.value) else None, "step": m.step,
             "timestamp": m.timestamp} for m in points]}
