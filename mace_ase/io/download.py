"""Download one URL to one file so that a partial, wrong or corrupt body can never be seen under the final name.

The sequence (``download``):

1. ``GET`` with a connect timeout and a read timeout (the longest silence allowed between two chunks);
2. refuse an error status at once (404, 403, ...), and an HTML page even when it comes with status 200;
3. stream the body into a temporary file *in the destination folder* (``.<name>.<random>.part``), with a progress
   bar only when stderr is a terminal;
4. compare the byte count with ``Content-Length``;
5. run the caller's ``validate(temporary_path)`` (integrity and file-format checks), which raises to refuse the file;
6. ``os.replace`` the temporary file onto the destination (atomic on one file system).

Connection errors, timeouts, bodies cut short and statuses 408, 429 and 5xx are retried with exponential back-off.
A host name that cannot be resolved (DNS: no network, or a wrong name) is not retried: it fails at once, naming
``MACE_ASE_OFFLINE``, instead of spending the back-off on a machine that has no network.
Whatever happens, the temporary file is removed; the destination only ever appears complete and validated.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 15.0  # to open the connection
READ_TIMEOUT_S = 60.0  # the longest silence allowed between two chunks of the body
RETRIES = 3  # extra attempts after the first one, for transient failures only
BACKOFF_S = 2.0  # wait BACKOFF_S * 2**attempt seconds before the next attempt
CHUNK_BYTES = 1 << 20
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class DownloadError(RuntimeError):
    """A download failed; the message names what, the URL, the HTTP status (if any) and the destination."""

    def __init__(self, message: str, *, url: str, status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class _TransientError(Exception):
    """A failure worth another attempt (network trouble, server overload, body cut short)."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.status = status


def download(url: str, destination: Path, *, what: str, validate: Callable[[Path], None] | None = None) -> Path:
    """Download ``url`` to ``destination`` atomically, retrying transient failures.

    ``what`` names the file in messages (for example ``"model 'medium-mpa-0'"``). ``validate`` receives the complete
    temporary file and raises to refuse it; its exception propagates unchanged (and is not retried).
    Returns ``destination``. Raises ``DownloadError`` when the file cannot be fetched.
    """
    import requests  # lazy: only needed when something is really downloaded

    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    log.info("Downloading %s from %s to %s", what, url, destination)
    last: _TransientError | None = None
    for attempt in range(RETRIES + 1):
        if attempt:
            wait_s = BACKOFF_S * 2 ** (attempt - 1)
            log.warning("Download of %s failed (%s); attempt %d of %d in %.1f s", what, last, attempt + 1,
                        RETRIES + 1, wait_s)
            time.sleep(wait_s)
        handle, name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
        os.close(handle)
        temporary = Path(name)
        try:
            try:
                _fetch_once(requests, url, temporary, what=what, destination=destination)
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                if _name_resolution_failed(exc):
                    raise _unresolved_host_error(what, url, destination, exc) from exc
                raise _TransientError(f"{type(exc).__name__}: {exc}") from exc
            if validate is not None:
                validate(temporary)
            os.replace(temporary, destination)
            return destination
        except _TransientError as exc:
            last = exc
        finally:
            temporary.unlink(missing_ok=True)
    assert last is not None
    status = f"HTTP status {last.status}" if last.status else "no HTTP status"
    raise DownloadError(
        f"Could not download {what} from {url} after {RETRIES + 1} attempts: {last} ({status}). "
        f"Nothing was written to {destination}. Check the network (proxy variables HTTPS_PROXY/HTTP_PROXY), "
        "try again later, or set MACE_ASE_MIRROR to a mirror.",
        url=url, status=last.status,
    )


def _fetch_once(requests, url: str, temporary: Path, *, what: str, destination: Path) -> None:
    headers = {"User-Agent": "mace-ase (model registry)"}
    with requests.get(url, stream=True, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S), headers=headers) as response:
        status = response.status_code
        if status in RETRY_STATUSES:
            raise _TransientError(f"HTTP {status} {response.reason}", status)
        if status != 200:
            raise DownloadError(
                f"Could not download {what} from {url}: HTTP {status} {response.reason}. "
                f"Nothing was written to {destination}. "
                + ("The URL may be wrong or the file may have moved upstream." if status == 404 else ""),
                url=url, status=status,
            )
        if "text/html" in response.headers.get("Content-Type", "").lower():
            raise _html_error(what, url, destination, status)
        expected = _content_length(response.headers)
        with open(temporary, "wb") as sink, _progress_bar(expected, destination.name) as bar:
            for chunk in response.iter_content(CHUNK_BYTES):
                sink.write(chunk)
                bar.update(len(chunk))
    received = temporary.stat().st_size
    if expected is not None and received != expected:
        raise _TransientError(f"body cut short: received {received} of {expected} bytes", status)
    with open(temporary, "rb") as source:
        start = source.read(512).lstrip().lower()
    if start.startswith((b"<!doctype html", b"<html")):
        raise _html_error(what, url, destination, status)


def _name_resolution_failed(exc: BaseException) -> bool:
    """True when a DNS lookup failed somewhere in ``exc``'s chain (``socket.gaierror``, as urllib3 wraps it).

    Retrying does not help: offline machines fail this way at once, every time (even "temporary" EAI_AGAIN)."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, socket.gaierror) or type(error).__name__ == "NameResolutionError":
            return True
        pending += [error.__cause__, error.__context__, getattr(error, "reason", None)]
        pending += [arg for arg in error.args if isinstance(arg, BaseException)]
    return False


def _unresolved_host_error(what: str, url: str, destination: Path, exc: BaseException) -> DownloadError:
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or url
    proxy = next((os.environ[name] for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")
                  if os.environ.get(name)), None)
    through = f" (through the proxy {proxy})" if proxy else ""
    return DownloadError(
        f"Could not download {what} from {url}: the host name {host!r} could not be resolved{through}, so this "
        f"machine seems to have no network (or no DNS); not retried. Nothing was written to {destination}. "
        "Without network: set MACE_ASE_OFFLINE=1 and use a model already in the cache (MACE_ASE_CACHE_DIR, "
        "MACE_ASE_CACHE_PATH) or a local .model file; `mace-ase models download NAME` fetches one on a machine "
        "with network.",
        url=url,
    )


def _html_error(what: str, url: str, destination: Path, status: int) -> DownloadError:
    return DownloadError(
        f"Could not download {what} from {url}: the server sent an HTML page instead of a model file "
        f"(HTTP {status}); nothing was written to {destination}. A login page, a proxy error page or a "
        "github.com/.../blob/... page looks like this; use the raw file URL.",
        url=url, status=status,
    )


def _content_length(headers) -> int | None:
    # With a Content-Encoding (gzip) the header counts compressed bytes, not what iter_content yields.
    value = headers.get("Content-Length")
    if value is None or headers.get("Content-Encoding", "identity") != "identity":
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _progress_bar(total: int | None, label: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, leave=False,
                file=sys.stderr, disable=not sys.stderr.isatty())
