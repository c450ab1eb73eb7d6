"""Tests for the fetch stage: ordered sources, checksums, atomic writes, manifest, CLI."""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from cnnlab.core.errors import CnnlabError
from cnnlab.training.fetch import FILE_KEYS, MANIFEST, fetch_dataset, unchanged_since_fetch, verified_cache_path
from cnnlab.training.idx import write_idx
from cnnlab.training.prepare import main

from conftest import compose_cfg

NAMES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
DATASET = "tiny"


# ----------------------------------------------------------------------------- helpers


def make_dataset(folder: Path, seed: int = 0) -> Path:
    """Write four tiny IDX gzip files (20 train / 10 test 28x28 images) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, 20, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, 10, dtype=np.uint8),
    }
    for key, array in arrays.items():
        write_idx(folder / NAMES[key], array)
    return folder


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def content_md5_of(path: Path) -> str:
    return hashlib.md5(gzip.decompress(path.read_bytes())).hexdigest()


def data_cfg(sources, md5: dict | None = None, content_md5: dict | None = None) -> dict:
    """A data config like conf/data/*.yaml; md5/content_md5 map file keys to checksums."""
    md5, content_md5 = md5 or {}, content_md5 or {}
    files = {k: {"name": NAMES[k], "md5": md5.get(k), "content_md5": content_md5.get(k)} for k in FILE_KEYS}
    return {"name": DATASET, "files": files, "sources": [str(s) for s in sources]}


def float_idx(key: str) -> bytes:
    """An IDX file of float32 (type 0x0D) with the right number of dimensions for `key`."""
    shape = (1, 28, 28) if key.endswith("images") else (1,)
    header = b"\x00\x00\x0d" + bytes([len(shape)]) + b"".join(d.to_bytes(4, "big") for d in shape)
    return header + np.zeros(shape, dtype=">f4").tobytes()


def leftovers(dest: Path) -> list[str]:
    """Temporary files the fetcher might have left behind."""
    return sorted(p.name for p in dest.iterdir() if p.name.endswith((".part", ".tmp")))


def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_dir(tmp_path):
    """Serve a fresh directory over HTTP; yields (folder, base URL)."""
    folder = tmp_path / "www"
    folder.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def raw_http():
    """Start local TCP servers that answer every connection with fixed bytes; yields a URL factory."""
    servers = []

    def start(reply: bytes) -> str:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        servers.append(sock)

        def answer() -> None:
            while True:
                try:
                    conn, _ = sock.accept()
                except OSError:  # closed at teardown
                    return
                with conn:
                    conn.recv(65536)
                    conn.sendall(reply)

        threading.Thread(target=answer, daemon=True).start()
        return f"http://127.0.0.1:{sock.getsockname()[1]}/"

    yield start
    for sock in servers:
        sock.close()


@pytest.fixture
def src(tmp_path) -> Path:
    """A local directory holding a good copy of the dataset."""
    return make_dataset(tmp_path / "src")


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "data"


def assert_fetched(data_dir: Path, src: Path) -> None:
    """The four files in data_dir/<name>/ are byte-identical to those in src."""
    dest = data_dir / DATASET
    for name in NAMES.values():
        assert (dest / name).read_bytes() == (src / name).read_bytes(), name
    assert leftovers(dest) == []


# ----------------------------------------------------------------------------- sources


def test_local_directory_with_real_md5_writes_manifest(src, data_dir):
    """A plain-path source with correct .gz MD5s is fetched and described in manifest.json."""
    md5 = {k: md5_of(src / NAMES[k]) for k in FILE_KEYS}
    manifest = fetch_dataset(data_cfg([src], md5=md5), data_dir)

    assert_fetched(data_dir, src)
    on_disk = json.loads((data_dir / DATASET / MANIFEST).read_text())
    assert on_disk == manifest
    assert on_disk["dataset"] == DATASET
    assert set(on_disk["files"]) == set(FILE_KEYS)
    for key in FILE_KEYS:
        entry = on_disk["files"][key]
        assert entry["name"] == NAMES[key]
        assert entry["content_md5"] == content_md5_of(src / NAMES[key])
        assert entry["bytes"] == (src / NAMES[key]).stat().st_size
    expected = hashlib.md5("".join(content_md5_of(src / NAMES[k]) for k in FILE_KEYS).encode()).hexdigest()
    assert on_disk["checksum"] == expected


def test_manifest_checksum_identifies_content(tmp_path):
    """Different data gives a different dataset checksum; the same data the same one."""
    a = fetch_dataset(data_cfg([make_dataset(tmp_path / "a", seed=1)]), tmp_path / "d1")
    b = fetch_dataset(data_cfg([make_dataset(tmp_path / "b", seed=2)]), tmp_path / "d2")
    a_again = fetch_dataset(data_cfg([tmp_path / "a"]), tmp_path / "d3")
    assert a["checksum"] != b["checksum"]
    assert a["checksum"] == a_again["checksum"]


def test_file_url_source(src, data_dir):
    fetch_dataset(data_cfg([src.as_uri()]), data_dir)
    assert_fetched(data_dir, src)


def test_http_source(src, data_dir, http_dir):
    folder, url = http_dir
    make_dataset(folder)
    fetch_dataset(data_cfg([url], md5={k: md5_of(folder / NAMES[k]) for k in FILE_KEYS}), data_dir)
    assert_fetched(data_dir, folder)


def test_falls_back_to_next_source_and_warns(src, data_dir, tmp_path, caplog):
    missing = tmp_path / "does-not-exist"
    with caplog.at_level(logging.WARNING, logger="cnnlab.training.fetch"):
        manifest = fetch_dataset(data_cfg([missing, src]), data_dir)
    assert_fetched(data_dir, src)
    assert manifest["dataset"] == DATASET
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(missing) in w and NAMES["train_images"] in w for w in warnings), warnings


def test_first_working_source_wins(tmp_path, data_dir):
    """Sources are tried in the configured order, not any other."""
    first, second = make_dataset(tmp_path / "first", seed=1), make_dataset(tmp_path / "second", seed=2)
    fetch_dataset(data_cfg([first, second]), data_dir)
    assert_fetched(data_dir, first)


def test_http_404_tries_next_source(src, data_dir, http_dir):
    _, url = http_dir  # served directory is empty: every request is a 404
    fetch_dataset(data_cfg([url, src]), data_dir)
    assert_fetched(data_dir, src)


def test_all_sources_fail_error_names_dataset_sources_and_reasons(data_dir, http_dir, tmp_path):
    _, url = http_dir
    missing = tmp_path / "nowhere"
    with pytest.raises(CnnlabError) as info:
        fetch_dataset(data_cfg([url, missing]), data_dir)
    message = str(info.value)
    assert DATASET in message
    assert url in message
    assert str(missing) in message
    assert "HTTP 404" in message
    for name in NAMES.values():
        assert name in message
    # and how to go on without a network
    assert "apt-get install dataset-fashion-mnist" in message and "data=custom data.path=" in message
    assert "\n" not in message


def test_unreachable_host_reports_cannot_reach_and_uses_next(src, data_dir, caplog):
    dead = f"http://127.0.0.1:{closed_port()}/"
    with caplog.at_level(logging.WARNING, logger="cnnlab.training.fetch"):
        fetch_dataset(data_cfg([dead, src]), data_dir, timeout=5)
    assert_fetched(data_dir, src)
    assert any("cannot reach" in r.getMessage() and dead in r.getMessage() for r in caplog.records)

    with pytest.raises(CnnlabError, match="cannot reach"):
        fetch_dataset(data_cfg([dead]), data_dir / "other", timeout=5)


@pytest.mark.parametrize(
    "reply, reason",
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n\x1f\x8b", "truncated"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n100\r\n\x1f\x8b", None),
        (b"SSH-2.0-OpenSSH_9.6\r\n", None),
    ],
    ids=["short-content-length", "cut-chunked-transfer", "not-an-http-server"],
)
def test_broken_http_transfer_falls_back(src, data_dir, raw_http, reply, reason):
    """A mirror that cuts the transfer short or does not speak HTTP is skipped like any other failure."""
    bad = raw_http(reply)
    fetch_dataset(data_cfg([bad, src]), data_dir, timeout=5)
    assert_fetched(data_dir, src)

    with pytest.raises(CnnlabError, match=reason) as info:
        fetch_dataset(data_cfg([bad]), data_dir / "other", timeout=5)
    assert bad in str(info.value)
    assert leftovers(data_dir / "other" / DATASET) == []


# ----------------------------------------------------------------------------- verification


def test_wrong_md5_is_rejected_and_leaves_nothing(src, data_dir):
    md5 = {k: md5_of(src / NAMES[k]) for k in FILE_KEYS}
    md5["test_labels"] = "0" * 32
    with pytest.raises(CnnlabError, match="checksum mismatch"):
        fetch_dataset(data_cfg([src], md5=md5), data_dir)
    dest = data_dir / DATASET
    assert not (dest / NAMES["test_labels"]).exists()
    assert leftovers(dest) == []
    assert not (dest / MANIFEST).exists()


def test_truncated_gzip_rejected_then_next_source(src, data_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in NAMES.values():
        data = (src / name).read_bytes()
        (broken / name).write_bytes(data[: len(data) // 2])

    with pytest.raises(CnnlabError, match="not a complete gzip"):
        fetch_dataset(data_cfg([broken]), data_dir)
    assert not any((data_dir / DATASET / n).exists() for n in NAMES.values())

    fetch_dataset(data_cfg([broken, src]), data_dir)
    assert_fetched(data_dir, src)


@pytest.mark.parametrize(
    "payload", [lambda key: b"<html>not found</html>", float_idx], ids=["html-page", "float-idx"]
)
def test_not_idx_ubyte_content_is_rejected(data_dir, tmp_path, payload):
    """A complete gzip that does not hold an IDX ubyte file is refused, for every file."""
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    for key, name in NAMES.items():
        (bogus / name).write_bytes(gzip.compress(payload(key)))
    with pytest.raises(CnnlabError, match="IDX") as info:
        fetch_dataset(data_cfg([bogus]), data_dir)
    for name in NAMES.values():
        assert name in str(info.value)


def test_regzipped_copy_verifies_via_content_md5(src, data_dir, tmp_path):
    """A repackaged copy (different .gz bytes, same IDX bytes) passes on content_md5."""
    repacked = tmp_path / "repacked"
    repacked.mkdir()
    md5, content_md5 = {}, {}
    for key, name in NAMES.items():
        raw = gzip.decompress((src / name).read_bytes())
        published = gzip.compress(raw, mtime=0)
        (repacked / name).write_bytes(gzip.compress(raw, mtime=123456789))
        md5[key] = hashlib.md5(published).hexdigest()
        content_md5[key] = hashlib.md5(raw).hexdigest()
        assert md5_of(repacked / name) != md5[key]

    with pytest.raises(CnnlabError, match="checksum mismatch"):
        fetch_dataset(data_cfg([repacked], md5=md5), data_dir / "md5-only")

    manifest = fetch_dataset(data_cfg([repacked], md5=md5, content_md5=content_md5), data_dir)
    assert_fetched(data_dir, repacked)
    assert {k: manifest["files"][k]["content_md5"] for k in FILE_KEYS} == content_md5


def test_wrong_content_md5_is_rejected(src, data_dir):
    with pytest.raises(CnnlabError, match="checksum mismatch"):
        fetch_dataset(data_cfg([src], content_md5={k: "f" * 32 for k in FILE_KEYS}), data_dir)


# ----------------------------------------------------------------------------- existing files


def test_verified_files_are_not_fetched_again(src, data_dir):
    md5 = {k: md5_of(src / NAMES[k]) for k in FILE_KEYS}
    first = fetch_dataset(data_cfg([src], md5=md5), data_dir)
    dest = data_dir / DATASET
    before = {n: (dest / n).stat().st_mtime_ns for n in NAMES.values()}
    shutil.rmtree(src)

    second = fetch_dataset(data_cfg([src], md5=md5), data_dir)
    assert second == first
    assert {n: (dest / n).stat().st_mtime_ns for n in NAMES.values()} == before


def test_corrupt_existing_file_is_replaced(src, data_dir):
    fetch_dataset(data_cfg([src]), data_dir)
    target = data_dir / DATASET / NAMES["train_images"]
    good = target.read_bytes()
    target.write_bytes(good[: len(good) // 3])

    fetch_dataset(data_cfg([src]), data_dir)
    assert target.read_bytes() == good
    assert_fetched(data_dir, src)


def test_total_failure_leaves_no_partial_files_or_manifest(data_dir, tmp_path, http_dir):
    _, url = http_dir
    with pytest.raises(CnnlabError):
        fetch_dataset(data_cfg([tmp_path / "nowhere", url]), data_dir)
    dest = data_dir / DATASET
    assert sorted(p.name for p in dest.iterdir()) == []


def test_failure_after_success_removes_stale_manifest(src, data_dir, tmp_path):
    """If a file goes bad and cannot be re-fetched, the old manifest must not vouch for it."""
    fetch_dataset(data_cfg([src]), data_dir)
    dest = data_dir / DATASET
    assert (dest / MANIFEST).exists()
    (dest / NAMES["test_labels"]).write_bytes(b"garbage")

    with pytest.raises(CnnlabError, match=NAMES["test_labels"]):
        fetch_dataset(data_cfg([tmp_path / "nowhere"]), data_dir)
    assert not (dest / MANIFEST).exists()
    assert leftovers(dest) == []


# ----------------------------------------------------------------------------- verified cache


def test_verified_cache_is_one_file_per_data_folder_in_the_user_cache(tmp_path, monkeypatch):
    xdg = Path(os.environ["XDG_CACHE_HOME"])  # conftest: every test has its own
    path = verified_cache_path(tmp_path / "data", DATASET)
    assert path.parent == xdg / "cnnlab" / "verified" and path.suffix == ".json"
    monkeypatch.chdir(tmp_path)
    assert verified_cache_path("data", DATASET) == path  # the folder's absolute path is the key
    assert verified_cache_path(tmp_path / "other", DATASET) != path
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for value in (None, "", "relative/cache"):  # the XDG default: ~/.cache
        if value is None:
            monkeypatch.delenv("XDG_CACHE_HOME")
        else:
            monkeypatch.setenv("XDG_CACHE_HOME", value)
        assert verified_cache_path("data", DATASET).parent == tmp_path / "home" / ".cache" / "cnnlab" / "verified"


def test_touched_files_are_checked_by_content_and_only_the_cache_is_written(src, data_dir):
    manifest = fetch_dataset(data_cfg([src]), data_dir)
    dest, written = data_dir / DATASET, (data_dir / DATASET / MANIFEST).read_bytes()
    cache = verified_cache_path(data_dir, DATASET)
    assert unchanged_since_fetch(data_dir, manifest) and not cache.exists()  # as fetched: nothing to note
    for name in NAMES.values():
        os.utime(dest / name, ns=(0, (dest / name).stat().st_mtime_ns + 10**9))
    assert unchanged_since_fetch(data_dir, manifest)
    noted = json.loads(cache.read_text())
    assert noted["folder"] == str(dest.resolve()) and sorted(noted["files"]) == sorted(NAMES.values())
    assert (dest / MANIFEST).read_bytes() == written

    cache.write_text("{not json")  # a damaged cache is only a slower check
    assert unchanged_since_fetch(data_dir, manifest) and json.loads(cache.read_text())["files"]
    # Another content (a valid IDX file, new mtime): neither the manifest nor the cache vouches for it.
    write_idx(dest / NAMES["test_labels"], np.zeros(10, dtype=np.uint8))
    assert not unchanged_since_fetch(data_dir, manifest)
    (dest / NAMES["test_labels"]).unlink()
    assert not unchanged_since_fetch(data_dir, manifest)


# ----------------------------------------------------------------------------- CLI


def write_params(path: Path, source: Path, data_dir: Path, *overrides: str) -> Path:
    """A params.yaml composed from conf/ (as `cnnlab params` writes it): data=custom named
    DATASET, reading `source`, into `data_dir`."""
    cfg = compose_cfg("data=custom", f"data.name={DATASET}", f"data.path={source}", f"paths.data_dir={data_dir}",
                      "fetch.timeout_s=5", *overrides)
    OmegaConf.save(OmegaConf.create(cfg), path)
    return path


def test_cli_success(src, data_dir, tmp_path, capsys):
    params = write_params(tmp_path / "params.yaml", src, data_dir)
    assert main(["--params", str(params)]) == 0
    assert_fetched(data_dir, src)
    out = capsys.readouterr().out
    assert DATASET in out and "verified" in out
    manifest = json.loads((data_dir / DATASET / MANIFEST).read_text())
    assert manifest["checksum"] in out and manifest["sources"] == [str(src)]


def test_cli_with_composed_config(src, tmp_path, capsys):
    """A params.yaml composed from conf/ with data=custom fetches from data.path."""
    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[1] / "conf"
    overrides = ["data=custom", f"data.path={src}", f"paths.data_dir={tmp_path / 'data'}"]
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    params = tmp_path / "params.yaml"
    OmegaConf.save(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)), params)

    assert main(["--params", str(params)]) == 0
    assert (tmp_path / "data" / "custom" / MANIFEST).is_file()
    for name in NAMES.values():
        assert (tmp_path / "data" / "custom" / name).read_bytes() == (src / name).read_bytes()


@pytest.mark.parametrize("override, key", [
    ("data.sources=[]", "data.sources"), ("fetch.timeout_s=0", "fetch.timeout_s"), ("+data.colour=red", "data.colour"),
])
def test_cli_rejects_an_invalid_params_file_before_fetching(src, data_dir, tmp_path, capsys, override, key):
    """The data and fetch sections are checked first: one error line naming the key, nothing fetched."""
    params = write_params(tmp_path / "params.yaml", src, data_dir, override)
    assert main(["--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert key in err and "Traceback" not in err
    assert not (data_dir / DATASET).exists()


def test_cli_failure_prints_one_error_line(data_dir, tmp_path, capsys):
    params = write_params(tmp_path / "params.yaml", tmp_path / "nowhere", data_dir)
    assert main(["--params", str(params)]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith(("WARNING ", "INFO "))]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:")
    assert DATASET in lines[0]
    assert "Traceback" not in err


def test_cli_missing_params_file(tmp_path, capsys):
    missing = tmp_path / "no-params.yaml"
    assert main(["--params", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:")
    assert str(missing) in err and "not found" in err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- other formats' folders


def test_a_file_as_a_source_says_sources_are_folders(src, data_dir, tmp_path):
    from cnnlab.training.fetch import SourceError, copy_from

    with pytest.raises(SourceError, match=r"is a file: data.sources lists folders \(or URLs of folders\) that hold x"):
        copy_from(str(src / NAMES["train_images"]), "x", tmp_path / "tmp", 5)
    with pytest.raises(CnnlabError) as excinfo:
        fetch_dataset(data_cfg([src / NAMES["train_images"]]), data_dir)
    assert "\n" not in str(excinfo.value) and f"{src / NAMES['train_images']} is a file" in str(excinfo.value)


def foreign_manifest(dest: Path, fmt: str) -> dict:
    """Another format's prepared data in `dest`: a manifest and the .npy arrays it names."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("train-images.npy", "train-labels.npy", "test-images.npy", "test-labels.npy"):
        np.save(dest / name, np.zeros(3, dtype=np.uint8))
    manifest = {"dataset": dest.name, "format": fmt, "checksum": "abc", "source": "/home/me/pictures/mnist",
                "arrays": {}}
    (dest / MANIFEST).write_text(json.dumps(manifest))
    return manifest


@pytest.mark.parametrize("fmt", ["folder", "cifar10"])
def test_idx_fetch_never_deletes_or_overwrites_another_formats_data(src, data_dir, fmt):
    from cnnlab.training.datasets import FORMATS
    from cnnlab.training.fetch import is_current, local_checksum

    dest = data_dir / DATASET
    manifest = foreign_manifest(dest, fmt)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    cfg = data_cfg([src])
    assert not is_current(manifest, cfg) and not FORMATS["idx"].ready({**cfg, "format": "idx"}, data_dir)
    assert local_checksum(data_dir, cfg) is None
    with pytest.raises(CnnlabError) as excinfo:
        fetch_dataset(cfg, data_dir)
    message = str(excinfo.value)
    assert "\n" not in message and message == (f"{dest} holds dataset '{DATASET}' of another format ({fmt}, from "
                                                f"/home/me/pictures/mnist); set data.name=<another name> (or "
                                                f"paths.data_dir) for one of them")
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before


def test_a_cut_short_manifest_is_fetched_again(src, data_dir):
    fetch_dataset(data_cfg([src]), data_dir)
    (data_dir / DATASET / MANIFEST).write_text('{"dataset": "ti')
    assert fetch_dataset(data_cfg([src]), data_dir)["dataset"] == DATASET


@pytest.mark.parametrize("fmt", ["folder", "idx"])
def test_cifar10_never_goes_into_another_formats_dataset(data_dir, tmp_path, fmt):
    from cnnlab.training import cifar10

    from conftest import CIFAR_CLASSES, write_cifar_archive

    archive = write_cifar_archive(tmp_path / "www" / "cifar-10-python.tar.gz")
    spec = {"name": DATASET, "format": "cifar10", "archive": {"name": archive.name, "md5": None},
            "sources": [str(archive.parent)], "class_names": list(CIFAR_CLASSES), "num_classes": 10,
            "channels": 3, "image_size": 32}
    dest = data_dir / DATASET
    if fmt == "idx":
        make_dataset(tmp_path / "idx")
        fetch_dataset(data_cfg([tmp_path / "idx"]), data_dir)
    else:
        foreign_manifest(dest, fmt)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    assert not cifar10.ready(spec, data_dir) and cifar10.checksum(spec, data_dir) is None
    with pytest.raises(CnnlabError) as excinfo:
        cifar10.prepare(spec, data_dir, 5)
    message = str(excinfo.value)
    assert "\n" not in message and f"{dest} holds dataset '{DATASET}' of another format ({fmt}" in message
    assert "data.name=" in message
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
