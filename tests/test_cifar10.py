"""Tests for data=cifar10 (cnnlab.training.cifar10): the archive from ordered sources (folders,
file:// URLs, a local HTTP server), its MD5, safe unpacking, the prepared arrays and their manifest."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pickle
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from cnnlab.core.config import DataSpec, parse
from cnnlab.core.errors import CnnlabError
from cnnlab.training import cifar10, prepared
from cnnlab.training.fetch import SourceError

from conftest import CIFAR_CLASSES, cifar_batches, compose_cfg, pack_cifar_archive, py2_pickle, write_cifar_archive

pytestmark = pytest.mark.fast
ARCHIVE = "cifar-10-python.tar.gz"
MEMBERS = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")


# ----------------------------------------------------------------------------- helpers


def spec(sources, md5: str | None = None, name: str = "cifar10", class_names=CIFAR_CLASSES) -> dict:
    """What prepare gets: dataclasses.asdict(DataSpec) of conf/data/cifar10.yaml, in the parts it reads."""
    return {"name": name, "format": "cifar10", "archive": {"name": ARCHIVE, "md5": md5},
            "sources": [str(s) for s in sources], "class_names": list(class_names),
            "num_classes": len(class_names), "channels": 3, "image_size": 32}


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".part", ".tmp")))


def expected_arrays(n_train_per_batch: int = 10, n_test: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """What the tiny archive holds, reshaped as CIFAR-10 says: channel-major, then rows."""
    batches = cifar_batches(n_train_per_batch, n_test, seed)
    train = [batches[m] for m in MEMBERS[:5]]
    return {"train_images": np.concatenate([b[b"data"] for b in train]).reshape(-1, 3, 32, 32),
            "train_labels": np.array([v for b in train for v in b[b"labels"]], dtype=np.int64),
            "test_images": batches["test_batch"][b"data"].reshape(-1, 3, 32, 32),
            "test_labels": np.array(batches["test_batch"][b"labels"], dtype=np.int64)}


def archive_with(folder: Path, **members) -> Path:
    """The tiny archive with some members replaced (bytes) or left out (None)."""
    folder.mkdir(parents=True, exist_ok=True)
    packed = {name: py2_pickle(batch) for name, batch in cifar_batches().items()}
    for name, data in members.items():
        name = name.replace("batches_meta", "batches.meta")
        if data is None:
            packed.pop(name)
        else:
            packed[name] = data
    return pack_cifar_archive(folder / ARCHIVE, packed)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()}


class _Handler(BaseHTTPRequestHandler):
    """Serves server.routes: path -> (body, declared Content-Length); anything else is a 404."""

    def do_GET(self) -> None:
        self.server.hits.append(self.path)
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404, "Not Found")
            return
        body, declared = route
        self.send_response(200)
        self.send_header("Content-Length", str(declared))
        self.end_headers()
        self.wfile.write(body)  # fewer bytes than declared: the connection then closes (HTTP/1.0)

    def log_message(self, *args) -> None:
        pass


class Server:
    def __init__(self) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.routes, self.httpd.hits = {}, []
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def put(self, folder: str, path: Path, cut: int = 0) -> str:
        """Serve the file at /<folder>/<its name> (its last `cut` bytes missing but announced); the
        source URL (the folder)."""
        body = path.read_bytes()
        self.httpd.routes[f"/{folder}/{path.name}"] = (body[:len(body) - cut], len(body))
        return f"{self.base}/{folder}/"

    def hits(self, folder: str) -> int:
        return sum(hit.startswith(f"/{folder}/") for hit in self.httpd.hits)


@pytest.fixture
def server():
    srv = Server()
    thread = threading.Thread(target=srv.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A folder holding a good tiny archive."""
    return write_cifar_archive(tmp_path_factory.mktemp("good") / ARCHIVE).parent


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "data"


def assert_prepared(data_dir: Path, archive: Path, origin: str, name: str = "cifar10") -> dict:
    dest = data_dir / name
    manifest = prepared.read_manifest(dest)
    assert manifest["dataset"] == name and manifest["format"] == "cifar10" and manifest["archive"] == ARCHIVE
    assert manifest["checksum"] == md5_of(archive) == md5_of(dest / ARCHIVE)
    assert manifest["source"] == origin
    assert manifest["counts"] == {"train": 50, "test": 10}
    assert manifest["class_names"] == CIFAR_CLASSES
    for key, want in expected_arrays().items():
        got = np.load(dest / prepared.array_file(key), allow_pickle=False)
        assert got.dtype == want.dtype and got.shape == want.shape, key
        np.testing.assert_array_equal(got, want, err_msg=key)
    assert leftovers(dest) == []
    return manifest


# ----------------------------------------------------------------------------- sources


def test_http_source_unpacks_the_pickled_data_channel_major(good, data_dir, server):
    url = server.put("kriz", good / ARCHIVE)
    s = spec([url], md5=md5_of(good / ARCHIVE))
    manifest = cifar10.prepare(s, data_dir, 5)
    assert_prepared(data_dir, good / ARCHIVE, f"{server.base}/kriz/{ARCHIVE}")
    assert manifest == prepared.read_manifest(data_dir / "cifar10")
    # Pixel (row 1, columns 4..27) of a class-0 training image is the red bar: R plane first.
    images, labels = prepared.load(data_dir / "cifar10", "train")
    first = images[labels == 0][0]
    assert first[:, 1, 10].tolist() == [255, 0, 0]
    assert cifar10.ready(s, data_dir)
    assert cifar10.checksum(s, data_dir) == md5_of(good / ARCHIVE)
    assert cifar10.source(s, data_dir) == f"{server.base}/kriz/{ARCHIVE}"


@pytest.mark.parametrize("as_url", [False, True], ids=["folder", "file-url"])
def test_local_folder_or_file_url(good, data_dir, as_url):
    source = good.as_uri() if as_url else str(good)
    cifar10.prepare(spec([source]), data_dir, 5)
    origin = f"{good.as_uri()}/{ARCHIVE}" if as_url else str(good / ARCHIVE)
    assert_prepared(data_dir, good / ARCHIVE, origin)


def test_composed_config_spec(good, data_dir):
    """The DataSpec of conf/data/cifar10.yaml, as a run passes it, with a local source."""
    cfg = compose_cfg("data=cifar10", f"data.sources=[{good}]", f"data.archive.md5={md5_of(good / ARCHIVE)}")
    s = dataclasses.asdict(parse(DataSpec, cfg["data"], "data"))
    cifar10.prepare(s, data_dir, 5)
    assert cifar10.ready(s, data_dir)
    assert_prepared(data_dir, good / ARCHIVE, str(good / ARCHIVE))


def test_source_before_prepare_is_the_first_source():
    s = spec(["https://www.cs.toronto.edu/~kriz/", "/mnt/data"])
    assert cifar10.source(s, Path("/nonexistent")) == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert cifar10.checksum(s, Path("/nonexistent")) is None
    assert not cifar10.ready(s, Path("/nonexistent"))


def test_first_bad_source_then_good_one(good, data_dir, server, tmp_path, caplog):
    empty = tmp_path / "empty"
    empty.mkdir()
    missing_url = f"{server.base}/nothing/"
    good_url = server.put("kriz", good / ARCHIVE)
    with caplog.at_level(logging.WARNING, logger="cnnlab.training.cifar10"):
        cifar10.prepare(spec([empty, missing_url, good_url], md5=md5_of(good / ARCHIVE)), data_dir, 5)
    assert_prepared(data_dir, good / ARCHIVE, f"{good_url}{ARCHIVE}")
    assert "no such file" in caplog.text and "HTTP 404" in caplog.text


def test_first_working_source_wins(good, data_dir, server):
    first, second = server.put("one", good / ARCHIVE), server.put("two", good / ARCHIVE)
    cifar10.prepare(spec([first, second]), data_dir, 5)
    assert (server.hits("one"), server.hits("two")) == (1, 0)


def test_404_everywhere_is_one_line_naming_each_source_and_the_offline_way(data_dir, server, tmp_path):
    url = f"{server.base}/kriz/"
    with pytest.raises(CnnlabError) as info:
        cifar10.prepare(spec([tmp_path / "nowhere", url], md5="c58f30108f718f92721af3b95e74349a"), data_dir, 5)
    message = str(info.value)
    assert "\n" not in message
    assert f"{tmp_path / 'nowhere'}: no such directory" in message
    assert f"{url}: HTTP 404" in message
    assert "cifar-10-python.tar.gz (md5 c58f30108f718f92721af3b95e74349a)" in message
    assert "data.sources=[/that/folder]" in message
    assert leftovers(data_dir / "cifar10") == []
    assert not (data_dir / "cifar10" / prepared.MANIFEST).exists()


def test_truncated_http_response_is_refused_then_next_source(good, data_dir, server):
    cut = server.put("cut", good / ARCHIVE, cut=1000)
    with pytest.raises(CnnlabError, match="truncated") as info:
        cifar10.prepare(spec([cut]), data_dir, 5)
    assert cut in str(info.value) and "\n" not in str(info.value)
    dest = data_dir / "cifar10"
    assert leftovers(dest) == [] and not (dest / ARCHIVE).exists()

    cifar10.prepare(spec([cut, good]), data_dir, 5)
    assert_prepared(data_dir, good / ARCHIVE, str(good / ARCHIVE))


# ----------------------------------------------------------------------------- verification


def test_wrong_md5_is_refused_and_keeps_nothing(good, data_dir, server):
    url = server.put("kriz", good / ARCHIVE)
    with pytest.raises(CnnlabError, match="checksum mismatch") as info:
        cifar10.prepare(spec([url], md5="0" * 32), data_dir, 5)
    assert f"{url}: checksum mismatch" in str(info.value) and "\n" not in str(info.value)
    dest = data_dir / "cifar10"
    assert sorted(p.name for p in dest.iterdir()) == []


def test_md5_compared_whatever_its_case(good, data_dir):
    cifar10.prepare(spec([good], md5=md5_of(good / ARCHIVE).upper()), data_dir, 5)
    assert cifar10.ready(spec([good], md5=md5_of(good / ARCHIVE).upper()), data_dir)


def _evil() -> bytes:
    class Evil:
        def __reduce__(self):
            return os.system, ("touch pwned",)
    return pickle.dumps({b"data": Evil(), b"labels": []})


def _bad_shape() -> bytes:
    return py2_pickle({b"data": np.zeros((4, 3000), np.uint8), b"labels": [0, 1, 2, 3]})


def _bad_label() -> bytes:
    return py2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})


@pytest.mark.parametrize("members, reason", [
    ({"test_batch": None}, "lacks cifar-10-batches-py/test_batch"),
    ({"data_batch_3": _bad_shape()}, "data_batch_3: data is uint8 4x3000, expected uint8 N x 3072"),
    ({"data_batch_1": py2_pickle({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]})},
     "data is float32 2x3072"),
    ({"test_batch": _bad_label()}, "test_batch: label 10 outside 0..9"),
    ({"data_batch_2": py2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})}, "1 labels for 2 images"),
    ({"data_batch_2": py2_pickle({b"data": np.zeros((1, 3072), np.uint8), b"labels": ["x"]})},
     "labels are not a list of integers"),
    ({"batches_meta": py2_pickle({b"num_vis": 3072})}, "batches.meta has no list of label_names"),
    ({"data_batch_4": b"\x80\x02}q\x00"}, "data_batch_4 is not a CIFAR-10 batch pickle"),
    ({"data_batch_5": py2_pickle([1, 2])}, "data_batch_5 holds a list, expected a dict"),
    ({"test_batch": _evil()}, f"refuses to load {os.system.__module__}.system"),
], ids=["missing-member", "wrong-shape", "wrong-dtype", "label-range", "label-count", "label-type", "no-meta-names",
        "cut-pickle", "not-a-dict", "os-system"])
def test_malformed_archive_is_one_line_and_leaves_nothing(data_dir, tmp_path, members, reason, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = archive_with(tmp_path / "bad", **members).parent
    with pytest.raises(CnnlabError) as info:
        cifar10.prepare(spec([bad]), data_dir, 5)
    message = str(info.value)
    assert f"{bad}: " in message and reason in message and "\n" not in message, message
    assert sorted(p.name for p in (data_dir / "cifar10").iterdir()) == []
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("content, reason", [
    (b"<html>Moved</html>", "not a complete gzip tar archive"),
    (None, "not a complete gzip tar archive"),  # cut in half
], ids=["not-gzip", "truncated-file"])
def test_not_an_archive_or_cut_short(good, data_dir, tmp_path, content, reason):
    bad = tmp_path / "bad"
    bad.mkdir()
    data = (good / ARCHIVE).read_bytes()
    (bad / ARCHIVE).write_bytes(content if content is not None else data[:len(data) // 2])
    with pytest.raises(CnnlabError, match=reason):
        cifar10.prepare(spec([bad]), data_dir, 5)
    assert leftovers(data_dir / "cifar10") == []


def test_restricted_unpickler_refuses_any_other_callable():
    for payload in (_evil(), pickle.dumps(dataclasses.replace), pickle.dumps(np.load)):
        with pytest.raises(SourceError, match="refuses to load"):
            cifar10._unpickle(payload, "test_batch")


def test_python3_pickles_of_a_repacked_archive_are_read(data_dir, tmp_path):
    """An archive repacked with Python 3 (protocol 4: numpy's new module name, str keys) reads the same."""
    members = {name: pickle.dumps({k.decode(): v for k, v in batch.items()}, protocol=4)
               for name, batch in cifar_batches().items()}
    archive = pack_cifar_archive(tmp_path / ARCHIVE, members)
    cifar10.prepare(spec([tmp_path]), data_dir, 5)
    assert_prepared(data_dir, archive, str(archive))


def test_class_names_not_the_archives_are_a_config_error(good, data_dir):
    names = [*CIFAR_CLASSES[1:], CIFAR_CLASSES[0]]
    with pytest.raises(CnnlabError, match="set data.class_names to the archive's") as info:
        cifar10.prepare(spec([good], class_names=names), data_dir, 5)
    assert "\n" not in str(info.value)
    # The archive itself verified, so it is kept (not fetched again once the config is fixed).
    assert (data_dir / "cifar10" / ARCHIVE).is_file()
    assert not (data_dir / "cifar10" / prepared.MANIFEST).exists()


# ----------------------------------------------------------------------------- what is already here


def test_verified_archive_here_is_not_fetched_again(good, data_dir, server):
    url = server.put("kriz", good / ARCHIVE)
    s = spec([url], md5=md5_of(good / ARCHIVE))
    cifar10.prepare(s, data_dir, 5)
    dest = data_dir / "cifar10"
    (dest / prepared.array_file("test_images")).unlink()
    assert not cifar10.ready(s, data_dir)
    cifar10.prepare(s, data_dir, 5)
    assert server.hits("kriz") == 1
    assert_prepared(data_dir, good / ARCHIVE, f"{url}{ARCHIVE}")  # still names where it came from
    assert cifar10.ready(s, data_dir)


def test_archive_put_here_by_hand_is_its_own_source(good, data_dir):
    dest = data_dir / "cifar10"
    write_cifar_archive(dest / ARCHIVE)
    s = spec(["http://127.0.0.1:9/unused/"], md5=md5_of(good / ARCHIVE))
    cifar10.prepare(s, data_dir, 5)
    assert_prepared(data_dir, good / ARCHIVE, str((dest / ARCHIVE).resolve()))


def test_archive_here_that_does_not_verify_is_fetched_again(good, data_dir, server, caplog):
    dest = data_dir / "cifar10"
    dest.mkdir(parents=True)
    (dest / ARCHIVE).write_bytes(b"half an archive")
    url = server.put("kriz", good / ARCHIVE)
    with caplog.at_level(logging.WARNING, logger="cnnlab.training.cifar10"):
        cifar10.prepare(spec([url], md5=md5_of(good / ARCHIVE)), data_dir, 5)
    assert "does not verify" in caplog.text
    assert server.hits("kriz") == 1
    assert_prepared(data_dir, good / ARCHIVE, f"{url}{ARCHIVE}")


def test_failed_prepare_leaves_the_previous_data_intact(good, data_dir, server):
    s = spec([good], md5=md5_of(good / ARCHIVE))
    cifar10.prepare(s, data_dir, 5)
    dest = data_dir / "cifar10"
    (dest / ARCHIVE).write_bytes(b"damaged")  # so the next prepare must fetch, and every source fails
    before = snapshot(dest)
    with pytest.raises(CnnlabError, match="HTTP 404"):
        cifar10.prepare(spec([f"{server.base}/gone/"], md5=s["archive"]["md5"]), data_dir, 5)
    assert snapshot(dest) == before
    assert cifar10.ready(s, data_dir)


def test_ready_only_while_the_arrays_and_the_config_are_unchanged(good, data_dir):
    md5 = md5_of(good / ARCHIVE)
    s = spec([good], md5=md5)
    cifar10.prepare(s, data_dir, 5)
    assert cifar10.ready(s, data_dir)
    assert cifar10.ready(spec(["/elsewhere"], md5=md5), data_dir)  # the MD5 pins the content, not the source
    assert not cifar10.ready(spec([good], md5="0" * 32), data_dir)
    assert not cifar10.ready(spec([good], md5=md5, class_names=[*CIFAR_CLASSES[1:], "x"]), data_dir)
    dest = data_dir / "cifar10"
    manifest_bytes = (dest / prepared.MANIFEST).read_bytes()
    labels = dest / prepared.array_file("train_labels")
    np.save(labels, np.zeros(50, np.int64))
    assert not cifar10.ready(s, data_dir)
    assert (dest / prepared.MANIFEST).read_bytes() == manifest_bytes  # ready writes nothing


def test_without_md5_any_well_formed_archive_is_accepted_and_its_md5_recorded(good, data_dir, tmp_path):
    s = spec([good])
    manifest = cifar10.prepare(s, data_dir, 5)
    assert manifest["checksum"] == md5_of(good / ARCHIVE)
    assert cifar10.ready(s, data_dir)
    # No checksum pins the content: other sources mean other data, fetched from them.
    other = write_cifar_archive(tmp_path / "other" / ARCHIVE, seed=7)
    s2 = spec([other.parent])
    assert not cifar10.ready(s2, data_dir)
    manifest = cifar10.prepare(s2, data_dir, 5)
    assert manifest["checksum"] == md5_of(other) != md5_of(good / ARCHIVE)
    assert manifest["source"] == str(other)


# ----------------------------------------------------------------------------- a run on it


@pytest.mark.train
def test_a_run_fetches_cifar10_from_its_address_and_records_the_archive(server, good, tmp_path):
    """data=cifar10 end to end: a training run fetches the archive from its (local) address, checks
    it against the MD5 in the config, trains a colour model, and records the archive's address and
    MD5 as its MLflow datasets' source and digest; the logged model takes 3x32x32 pixels."""
    import json

    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from cnnlab.core import keys
    from cnnlab.training.train import train

    md5 = md5_of(good / ARCHIVE)
    url = server.put("kriz", good / ARCHIVE)
    cfg = compose_cfg("data=cifar10", f"data.sources=[{url}]", f"data.archive.md5={md5}", "data.val_size=20",
                      f"paths.data_dir={tmp_path / 'data'}", f"paths.output_dir={tmp_path / 'run'}", "debug=smoke",
                      "callbacks.mlflow_model={_target_:cnnlab.training.callbacks.LogMLflowModel}")
    result = train(cfg)
    run = MlflowClient(mlflow.get_tracking_uri()).get_run(result["mlflow_run_id"])
    assert run.data.tags[keys.DATA_CHECKSUM] == md5 and run.data.tags[keys.TASK] == f"cifar10/10-class@{md5[:8]}"
    assert run.data.params["data.split.train_size"] == "30" and run.data.params["data.split.test_size"] == "10"
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "validation", "test"}
    for context, dataset in inputs.items():
        assert dataset.name == f"cifar10-{context}" and dataset.digest == md5[:len(dataset.digest)]
        assert json.loads(dataset.source)["uri"] == url + ARCHIVE and "3, 32, 32" in dataset.schema
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/{keys.MODEL_ARTIFACT}")
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert server.hits("kriz") == 1


def test_a_second_prepare_of_unchanged_data_writes_nothing(good, data_dir, server, monkeypatch, caplog):
    url = server.put("kriz", good / ARCHIVE)
    s = spec([url], md5=md5_of(good / ARCHIVE))
    first = cifar10.prepare(s, data_dir, 5)
    dest = data_dir / "cifar10"
    before = snapshot(dest)
    hashed = []
    monkeypatch.setattr(cifar10, "file_md5", lambda path: hashed.append(path) or md5_of(path))
    monkeypatch.setattr(cifar10, "_unpack", lambda path: pytest.fail("unpacked the archive again"))
    with caplog.at_level(logging.INFO, logger="cnnlab.training.cifar10"):
        assert cifar10.prepare(s, data_dir, 5) == first
    assert "unchanged" in caplog.text
    assert snapshot(dest) == before  # the arrays' and the manifest's bytes and mtimes
    assert hashed == [dest / ARCHIVE] and server.hits("kriz") == 1


def test_a_kept_archive_that_changed_is_unpacked_again(good, data_dir, tmp_path):
    s = spec([good], md5=None)
    cifar10.prepare(s, data_dir, 5)
    dest = data_dir / "cifar10"
    other = write_cifar_archive(tmp_path / "other" / ARCHIVE, seed=1)
    (dest / ARCHIVE).write_bytes(other.read_bytes())
    manifest = cifar10.prepare(s, data_dir, 5)  # not "unchanged": the archive no longer has the manifest's MD5
    assert manifest["checksum"] == md5_of(other) != md5_of(good / ARCHIVE)
