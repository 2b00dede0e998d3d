"""Download, cache and integrity behaviour of mace_ase.io.registry against a loopback HTTP server.

The server runs in a thread on 127.0.0.1 (never the internet). Each test scripts what the server answers for a path:
a list of behaviours used in turn (the last one repeats). After every failure the cache must hold nothing that could
pass for a model.
"""

from __future__ import annotations

import hashlib
import http.server
import multiprocessing
import threading
import time
import zipfile
from pathlib import Path

import pytest

from mace_ase.io import download as download_module
from mace_ase.io import integrity, registry
from mace_ase.io.registry import DownloadError, IntegrityError, ModelEntry, OfflineError

FIXTURE = Path(__file__).parent / "fixtures" / "models" / "mp0a_small.model"


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory) -> bytes:
    """A real (small, random-weight) MACE model file if the fixture exists, else a tiny zip with one data.pkl."""
    if FIXTURE.is_file():
        return FIXTURE.read_bytes()
    path = tmp_path_factory.mktemp("model") / "tiny.model"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("tiny/data.pkl", b"\x80\x02}q\x00.")
    return path.read_bytes()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        server = self.server
        with server.lock:
            server.hits[self.path] = server.hits.get(self.path, 0) + 1
            script = server.routes.get(self.path, [("status", 404)])
            behaviour = script[min(server.hits[self.path], len(script)) - 1]
        kind, *args = behaviour
        if kind == "slow":  # silence longer than the client's read timeout, then the file
            time.sleep(args[0])
            kind, args = "ok", [args[1]]
        if kind == "ok":
            self._send(200, args[0], "application/octet-stream")
        elif kind == "status":
            self._send(args[0], b"error\n", "text/plain")
        elif kind == "html":
            self._send(200, b"<!DOCTYPE html>\n<html><body>Sign in</body></html>\n", args[0] if args else "text/html")
        elif kind == "truncated":  # announce the full length, send half, hang up
            body = args[0]
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
        elif kind == "trickle":  # the whole file in 8 pieces, slowly, so concurrent clients overlap
            body, pause = args
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            step = len(body) // 8 + 1
            for start in range(0, len(body), step):
                self.wfile.write(body[start:start + step])
                self.wfile.flush()
                time.sleep(pause)
            server.finished = time.time()

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # keep test output clean
        pass


@pytest.fixture(scope="module")
def _httpd():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.routes, httpd.hits, httpd.lock = {}, {}, threading.Lock()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def server(_httpd):
    """The loopback server with no routes (every path is a 404) and no requests counted yet."""
    _httpd.routes.clear()
    _httpd.hits.clear()
    return _httpd


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch) -> Path:
    """A private cache, no registry variables, fast timeouts and back-off."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MACE_ASE_CACHE_DIR", str(cache))
    for name in ("MACE_ASE_OFFLINE", "MACE_ASE_MIRROR", "MACE_ASE_CACHE_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(download_module, "CONNECT_TIMEOUT_S", 2.0)
    monkeypatch.setattr(download_module, "READ_TIMEOUT_S", 0.3)
    monkeypatch.setattr(download_module, "RETRIES", 2)
    monkeypatch.setattr(download_module, "BACKOFF_S", 0.01)
    monkeypatch.setattr(registry, "_verified", set())
    monkeypatch.setattr(registry, "_notified", set())
    return cache


def entry_for(server, *, name: str = "tiny", checksum: str | None = None, licence: str = "MIT") -> ModelEntry:
    return ModelEntry(name, "mp", licence, "float32", checksum, f"{server.url}/files/{name}.model")


def assert_nothing_usable(cache: Path, file_name: str = "tiny.model") -> None:
    """The cache holds no file under the model's name and no file that passes the model-file check."""
    files = [path for path in cache.rglob("*") if path.is_file()] if cache.exists() else []
    assert not [path for path in files if path.name == file_name]
    for path in files:
        with pytest.raises(ValueError):
            registry.check_model_file(path)


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# ------------------------------------------------------------------------------------------------------- success


def test_good_download_records_sha256_and_is_reused(server, isolated, model_bytes):
    server.routes["/files/tiny.model"] = [("ok", model_bytes)]
    path = registry.fetch_entry(entry_for(server))
    assert path == isolated / "tiny.model" and path.read_bytes() == model_bytes
    sha256 = hashlib.sha256(model_bytes).hexdigest()
    assert (isolated / "tiny.model.sha256").read_text() == f"{sha256}  tiny.model\n"  # sha256sum format
    registry._verified.clear()  # a new process: hashed again, not downloaded again
    assert registry.fetch_entry(entry_for(server)) == path
    assert server.hits["/files/tiny.model"] == 1
    assert not list(isolated.glob("*.part"))


def test_git_blob_sha1_pinned_download(server, isolated, model_bytes):
    server.routes["/files/tiny.model"] = [("ok", model_bytes)]
    checksum = f"gitsha1:{git_blob_sha1(model_bytes)}"
    path = registry.fetch_entry(entry_for(server, checksum=checksum))
    assert registry.file_digest(path, "gitsha1") == checksum.split(":")[1]
    assert not (isolated / "tiny.model.sha256").exists()  # the catalogue checksum is the reference


@pytest.mark.parametrize("data, blob", [
    (b"", "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"),  # `git hash-object` of an empty file (git's empty blob)
    (b"hello\n", "ce013625030ba8dba906f756967f9e9ca394464a"),  # `echo hello | git hash-object --stdin`
])
def test_git_blob_sha1_agrees_with_git(tmp_path, data, blob):
    path = tmp_path / "x.model"
    path.write_bytes(data)
    assert registry.file_digest(path, "gitsha1") == blob


def test_503_then_200_is_retried(server, isolated, model_bytes):
    server.routes["/files/tiny.model"] = [("status", 503), ("ok", model_bytes)]
    assert registry.fetch_entry(entry_for(server)).read_bytes() == model_bytes
    assert server.hits["/files/tiny.model"] == 2


def test_mirror_serves_a_named_catalogue_model(server, isolated, monkeypatch, model_bytes):
    entry = registry.lookup("small")
    server.routes[f"/mirror/{entry.file_name}"] = [("ok", model_bytes)]
    monkeypatch.setenv("MACE_ASE_MIRROR", f"{server.url}/mirror/")
    assert registry.source_url(entry) == f"{server.url}/mirror/{entry.file_name}"
    path = registry.fetch("small")
    assert path == isolated / entry.file_name and path.read_bytes() == model_bytes
    assert server.hits == {f"/mirror/{entry.file_name}": 1}


def test_url_model_is_cached_by_url(server, isolated, model_bytes):
    server.routes["/some/where/my.model?download=1"] = [("ok", model_bytes)]
    url = f"{server.url}/some/where/my.model?download=1"
    path = registry.fetch_url(url)
    assert path.parent == isolated / "urls" and path.name.endswith("-my.model")
    assert registry.fetch_url(url) == path and server.hits["/some/where/my.model?download=1"] == 1


def test_licence_notice_logged_once(server, isolated, model_bytes, caplog):
    server.routes["/files/tiny.model"] = [("ok", model_bytes)]
    entry = entry_for(server, licence="ASL")
    registry.fetch_entry(entry)
    registry.fetch_entry(entry)
    notices = [r for r in caplog.records if "Academic Software License" in r.getMessage()]
    assert len(notices) == 1 and notices[0].levelname == "WARNING"


def test_models_mace_ase_cannot_run_are_refused_without_a_request(server, isolated, monkeypatch, model_bytes,
                                                                  capsys):
    """mh-0/mh-1/omol: refused before any download, even where a mirror would serve them (issue 12, defect 3)."""
    import argparse

    from mace_ase import foundations
    from mace_ase.cli import models as models_cli

    names = ["mh-0", "mh-1", "omol-0-extra-large"]
    for name in names:
        server.routes[f"/mirror/{registry.lookup(name).file_name}"] = [("ok", model_bytes)]
    monkeypatch.setenv("MACE_ASE_MIRROR", f"{server.url}/mirror/")
    for name in names:
        with pytest.raises(registry.UnsupportedModelError, match=f"'{name}'.*cannot run it.*Instead, use"):
            registry.fetch(name)
    with pytest.raises(registry.UnsupportedModelError, match="charge/spin.*mace_off"):
        foundations.mace_omol()  # its default model
    with pytest.raises(registry.UnsupportedModelError, match="non-linear interaction.*medium-omat-0"):
        foundations.mace_mp("mh-1", device="cpu")

    parser = argparse.ArgumentParser(prog="mace-ase")
    models_cli.register(parser.add_subparsers())
    for argv in (["info", "mh-1"], ["download", "mh-1"]):
        args = parser.parse_args(["models", *argv])
        assert args.func(args) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: Model 'mh-1'") and "Traceback" not in err and "Nothing was downloaded" in err
    assert server.hits == {}  # not one request
    assert not isolated.exists() or not any(isolated.iterdir())


# ------------------------------------------------------------------------------------------------------- failures


def test_404_names_model_url_status_and_cache_path(server, isolated):
    with pytest.raises(DownloadError) as info:
        registry.fetch_entry(entry_for(server))
    message = str(info.value)
    assert "'tiny'" in message and f"{server.url}/files/tiny.model" in message and "404" in message
    assert str(isolated / "tiny.model") in message and info.value.status == 404
    assert server.hits["/files/tiny.model"] == 1  # a 404 is not retried
    assert_nothing_usable(isolated)


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "application/octet-stream"])
def test_html_page_with_status_200_is_rejected(server, isolated, content_type):
    server.routes["/files/tiny.model"] = [("html", content_type)]
    with pytest.raises(DownloadError, match="HTML page"):
        registry.fetch_entry(entry_for(server))
    assert_nothing_usable(isolated)


def test_body_cut_short_is_retried_then_fails(server, isolated, model_bytes):
    server.routes["/files/tiny.model"] = [("truncated", model_bytes)]
    with pytest.raises(DownloadError) as info:
        registry.fetch_entry(entry_for(server))
    assert "3 attempts" in str(info.value) and str(isolated / "tiny.model") in str(info.value)
    assert server.hits["/files/tiny.model"] == 3
    assert_nothing_usable(isolated)


def test_body_cut_short_once_then_complete(server, isolated, model_bytes):
    server.routes["/files/tiny.model"] = [("truncated", model_bytes), ("ok", model_bytes)]
    assert registry.fetch_entry(entry_for(server)).read_bytes() == model_bytes


def test_slow_server_times_out(server, isolated, model_bytes):
    server.routes["/files/tiny.model"] = [("slow", 1.0, model_bytes)]
    start = time.perf_counter()
    with pytest.raises(DownloadError, match="Timeout|timed out"):
        registry.fetch_entry(entry_for(server))
    assert time.perf_counter() - start < 3.0  # 3 attempts x 0.3 s read timeout, not 3 x 1 s
    assert_nothing_usable(isolated)


def test_persistent_503_fails_with_status(server, isolated):
    server.routes["/files/tiny.model"] = [("status", 503)]
    with pytest.raises(DownloadError) as info:
        registry.fetch_entry(entry_for(server))
    assert info.value.status == 503 and "503" in str(info.value)
    assert_nothing_usable(isolated)


def test_file_that_is_not_a_model_is_rejected(server, isolated):
    server.routes["/files/tiny.model"] = [("ok", b"PK\x03\x04 this is not really a zip" * 10)]
    with pytest.raises(DownloadError, match="not a model file"):
        registry.fetch_entry(entry_for(server))
    assert_nothing_usable(isolated)


def test_wrong_pinned_checksum_is_rejected(server, isolated, model_bytes):
    server.routes["/files/tiny.model"] = [("ok", model_bytes)]
    with pytest.raises(IntegrityError, match="catalogue says 0000"):
        registry.fetch_entry(entry_for(server, checksum="gitsha1:" + "0" * 40))
    assert_nothing_usable(isolated)


# ------------------------------------------------------------------------------------------------ cache and offline


def test_corrupted_cached_file_is_detected_on_reuse(server, isolated, model_bytes):
    server.routes["/files/tiny.model"] = [("ok", model_bytes)]
    path = registry.fetch_entry(entry_for(server))
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    registry._verified.clear()
    with pytest.raises(IntegrityError, match="corrupt or was replaced"):
        registry.fetch_entry(entry_for(server))
    assert_nothing_usable(isolated)
    assert registry.fetch_entry(entry_for(server)).read_bytes() == model_bytes  # the next call downloads again
    assert server.hits["/files/tiny.model"] == 2


def test_offline_not_cached_fails_at_once_naming_the_file(server, isolated, monkeypatch):
    monkeypatch.setenv("MACE_ASE_OFFLINE", "1")
    with pytest.raises(OfflineError) as info:
        registry.fetch_entry(entry_for(server))
    assert str(isolated / "tiny.model") in str(info.value) and "tiny.model" in str(info.value)
    assert server.hits == {}


def test_offline_cached_works_without_network(server, isolated, monkeypatch, model_bytes):
    isolated.mkdir()
    (isolated / "tiny.model").write_bytes(model_bytes)  # copied in by hand, as the offline error says
    monkeypatch.setenv("MACE_ASE_OFFLINE", "1")
    assert registry.fetch_entry(entry_for(server)) == isolated / "tiny.model"
    assert (isolated / "tiny.model.sha256").is_file()  # first use recorded its hash
    assert server.hits == {}


def test_offline_value_must_be_understood(monkeypatch):
    monkeypatch.setenv("MACE_ASE_OFFLINE", "maybe")
    with pytest.raises(ValueError, match="MACE_ASE_OFFLINE"):
        registry.offline()


def test_shared_read_only_cache_is_searched_first(server, isolated, tmp_path, monkeypatch, model_bytes):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "tiny.model").write_bytes(model_bytes)
    monkeypatch.setenv("MACE_ASE_CACHE_PATH", f"{tmp_path / 'missing'}:{shared}")
    checksum = f"gitsha1:{git_blob_sha1(model_bytes)}"
    assert registry.fetch_entry(entry_for(server, checksum=checksum)) == shared / "tiny.model"
    assert server.hits == {} and not (shared / "tiny.model.sha256").exists()
    with pytest.raises(IntegrityError, match="read-only shared folder"):  # reported, never deleted
        registry.fetch_entry(entry_for(server, checksum="gitsha1:" + "1" * 40))
    assert (shared / "tiny.model").is_file()


def _race(entry: ModelEntry, results) -> None:
    started = time.time()
    try:
        results.put((started, str(registry.fetch_entry(entry))))
    except Exception as exc:  # reported to the parent, which fails the test
        results.put((started, f"error: {exc!r}"))


def test_three_processes_download_once_and_all_succeed(server, isolated, model_bytes, monkeypatch):
    # the children are forked: keep torch (used by the model reader, tested elsewhere) out of them
    monkeypatch.setattr(integrity, "_read_with_model_reader", lambda path: None)
    server.routes["/files/tiny.model"] = [("trickle", model_bytes, 0.08)]
    entry = entry_for(server)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    workers = [context.Process(target=_race, args=(entry, results)) for _ in range(3)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=20) for _ in workers]
    for worker in workers:
        worker.join(timeout=20)
    assert [path for _, path in outcomes] == [str(isolated / "tiny.model")] * 3
    deadline = time.time() + 10  # the handler records `finished` just after its last write: the client may be faster
    while not hasattr(server, "finished") and time.time() < deadline:
        time.sleep(0.01)
    assert max(started for started, _ in outcomes) < server.finished  # all three asked while it was downloading
    assert server.hits["/files/tiny.model"] == 1
    assert (isolated / "tiny.model").read_bytes() == model_bytes


def test_unresolvable_host_fails_at_once_without_retries(isolated, monkeypatch):
    """Offline machines fail the DNS lookup every time: no back-off, one attempt, a message naming the way out."""
    import socket

    lookups, sleeps = [], []

    def no_dns(*args, **kwargs):
        lookups.append(args[0])
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(download_module.time, "sleep", sleeps.append)
    entry = ModelEntry("tiny", "mp", "MIT", "float32", None, "https://models.example.invalid/tiny.model")
    with pytest.raises(DownloadError, match="could not be resolved") as info:
        registry.fetch_entry(entry)
    assert "MACE_ASE_OFFLINE" in str(info.value) and "models.example.invalid" in str(info.value)
    assert sleeps == [] and len(lookups) == 1
    assert_nothing_usable(isolated)
