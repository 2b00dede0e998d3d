"""Loader fuzzing: hundreds of damaged or hostile variants of a fixture model file.

Every variant must either load to exactly the intact model (same tensors, same r_max, heads and elements; and the
same ``hyperparameters``, what ``mace-ase models info`` prints) or raise
:class:`~mace_ase.io.model_file.ModelFileError` (a ``ValueError``) with a message. Nothing may crash the
interpreter (the loop runs in a subprocess whose exit code is checked), hang (an alarm bounds each file), run code
from the file (payloads would create a marker file) or escape as a raw ``KeyError``/``IndexError``/``struct.error``/
``RecursionError``/``MemoryError``/``RuntimeError``. The variants are drawn from fixed seeds, so a failure
reproduces: run ``python tests/test_fuzz_model_file.py OUT.jsonl`` and look for the variant named in the report.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "models" / "mp0a_medium.model"
SECONDS_PER_FILE = 20  # an alarm turns a hang into a reported failure
CLEAN = "clean"  # ModelFileError with a message
SAME = "same"  # loaded, equal to the intact model


# --------------------------------------------------------------------------------------------------- variants


def _members(data: bytes) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return [(info, archive.read(info)) for info in archive.infolist()]


def _zip(members: list[tuple[str, bytes]], compress: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compress) as archive:
        for name, payload in members:
            archive.writestr(name, payload)
    return buffer.getvalue()


def _with_pickle(data: bytes, payload: bytes) -> bytes:
    return _zip([(info.filename, payload if info.filename.endswith("/data.pkl") else blob)
                 for info, blob in _members(data)])


def _call_global(module: str, name: str, argument: str, protocol: int) -> bytes:
    """A pickle that calls ``module.name(argument)`` when loaded by a normal unpickler (written opcode by opcode:
    nothing is imported or patched to make it)."""
    text = argument.encode()
    call = b"X" + len(text).to_bytes(4, "little") + text + b"\x85R."
    if protocol == 2:
        return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n" + call
    names = b"".join(b"\x8c" + bytes([len(part)]) + part.encode() for part in (module, name))
    return b"\x80\x04" + names + b"\x93" + call


def _hostile_pickles(marker: str) -> dict[str, bytes]:
    """Hand-made pickles: disallowed globals, bad persistent ids and tensor geometry, deep and recursive data."""
    P = pickle
    touch = f"touch {marker}"
    out: dict[str, bytes] = {}
    for module, name in [("os", "system"), ("posix", "system"), ("builtins", "eval"), ("builtins", "exec"),
                         ("builtins", "getattr"), ("builtins", "__import__"), ("subprocess", "Popen"),
                         ("torch", "load"), ("torch.jit", "load"), ("torch.serialization", "load"),
                         ("numpy.core.multiarray", "_reconstruct"), ("pickle", "loads"), ("shutil", "rmtree"),
                         ("mace_ase.io.model_file", "read_model_file"), ("torch._utils", "_rebuild_qtensor"),
                         ("collections", "namedtuple"), ("builtins", "type"), ("copyreg", "_reconstructor")]:
        out[f"global {module}.{name}"] = _call_global(module, name, touch, 2)
        out[f"global4 {module}.{name}"] = _call_global(module, name, touch, 4)
    # the same payload hidden in the state of a plausible mace record (BUILD)
    record = (b"\x80\x02cmace.modules.models\nScaleShiftMACE\n)\x81}X\x08\x00\x00\x00_modules}X\x01\x00\x00\x00x"
              b"cos\nsystem\nX" + len(touch).to_bytes(4, "little") + touch.encode() + b"\x85Rsb.")
    out["payload inside a record state"] = record
    out["STACK_GLOBAL with non-string names"] = b"\x80\x04K\x01K\x02\x93."
    out["persistent id of the wrong shape"] = b"\x80\x02X\x03\x00\x00\x00abcQ."
    storage = b"ctorch\nDoubleStorage\n"

    def pid(key: str, numel: int) -> bytes:
        return (b"(X\x07\x00\x00\x00storage" + storage + b"X" + len(key).to_bytes(4, "little") + key.encode()
                + b"X\x03\x00\x00\x00cpu" + P.dumps(numel, protocol=2)[2:-1] + b"tQ")

    def tensor(key: str, numel: int, offset: int, size: tuple, stride: tuple) -> bytes:
        return (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(" + pid(key, numel)
                + P.dumps(offset, protocol=2)[2:-1] + P.dumps(size, protocol=2)[2:-1]
                + P.dumps(stride, protocol=2)[2:-1] + b"\x89ctorch\nSize\n)R" + b"tR.")

    out["persistent id naming a missing storage"] = tensor("no-such-key", 4, 0, (4,), (1,))
    out["persistent id with a path as key"] = tensor("../../../../etc/passwd", 4, 0, (4,), (1,))
    out["tensor larger than its storage"] = tensor("0", 8, 0, (10**6,), (1,))
    out["tensor with a huge declared size"] = tensor("0", 2**62, 0, (2**40, 2**20), (2**20, 1))
    out["tensor with overlapping strides (1e12 elements)"] = tensor("0", 8, 0, (10**6, 10**6), (0, 0))
    out["tensor with negative size"] = tensor("0", 8, 0, (-5,), (1,))
    out["tensor with negative offset"] = tensor("0", 8, -3, (2,), (1,))
    out["tensor with a negative stride"] = tensor("0", 8, 4, (3,), (-1,))
    out["tensor with non-integer geometry"] = tensor("0", 8, 0, ("a",), (1,))
    out["storage with a negative element count"] = tensor("0", -1, 0, (2,), (1,))
    depth = 200_000
    out["200000 nested lists"] = b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."
    out["200000 nested tuples"] = b"\x80\x02" + b")" + b"\x85" * depth + b"."
    # a model record whose _modules hold itself, and one whose modules form a DAG with 2**60 paths
    out["module that is its own child"] = (
        b"\x80\x02cmace.modules.models\nScaleShiftMACE\n)\x81q\x00}X\x08\x00\x00\x00_modules}X\x01\x00\x00\x00a"
        b"h\x00ssb.")
    dag = b"\x80\x02"
    dag += b"ctorch.nn.modules.container\nModuleList\n)\x81}X\x08\x00\x00\x00_modules}sbq\x00"
    for level in range(1, 61):
        dag += (b"ctorch.nn.modules.container\nModuleList\n)\x81}X\x08\x00\x00\x00_modules}(X\x01\x00\x00\x00a"
                + b"h" + bytes([level - 1]) + b"X\x01\x00\x00\x00bh" + bytes([level - 1]) + b"usbq" + bytes([level]))
        if level == 255:
            break
    dag += b"0cmace.modules.models\nScaleShiftMACE\n)\x81}X\x08\x00\x00\x00_modules}X\x04\x00\x00\x00rooth<ssb."
    out["modules sharing children 2**60 paths"] = dag
    out["huge string length"] = b"\x80\x02X\xff\xff\xff\xff" + b"a" * 100 + b"."
    out["huge bytes length (protocol 4)"] = b"\x80\x04\x8e" + (2**62).to_bytes(8, "little") + b"a" * 64 + b"."
    out["memo reference never stored"] = b"\x80\x02h\x07."
    out["memo slot 2**31 (the C unpickler would allocate 17 GB)"] = b"\x80\x02]r\xff\xff\xff\x7f."
    out["empty pickle"] = b""
    out["pickle with only a stop"] = b"."
    out["a big integer"] = b"\x80\x02\x8b" + (10**6).to_bytes(4, "little") + b"\x01" * 10**6 + b"."
    return out


def variants(data: bytes, marker: str) -> list[tuple[str, bytes]]:
    """All fuzz cases as (description, file bytes); deterministic."""
    import numpy as np

    rng = np.random.default_rng(20261202)
    members = _members(data)
    pickle_info, pickle_bytes = next((info, blob) for info, blob in members if info.filename.endswith("/data.pkl"))
    end_of_pickle = 64 + len(pickle_bytes)
    out: list[tuple[str, bytes]] = []

    def flipped(blob: bytes, count: int, low: int, high: int) -> tuple[bytes, list[int]]:
        buffer = bytearray(blob)
        where = sorted(int(w) for w in rng.integers(low, high, count))
        for offset in where:
            buffer[offset] ^= int(rng.integers(1, 256))
        return bytes(buffer), where

    for index in range(120):  # raw file bytes (zip CRCs should catch content damage)
        low, high = [(0, len(data)), (0, end_of_pickle), (len(data) - 12_000, len(data))][index % 3]
        blob, where = flipped(data, int(rng.integers(1, 9)), low, high)
        out.append((f"file bytes flipped at {where}", blob))
    for cut in [0, 1, 4, 30, 100, end_of_pickle // 2, end_of_pickle, len(data) - 23, len(data) - 22, len(data) - 1]:
        out.append((f"file truncated to {cut} bytes", data[:cut]))
    for cut in sorted(int(c) for c in rng.integers(1, len(data), 40)):
        out.append((f"file truncated to {cut} bytes", data[:cut]))
    names = [info.filename for info, _ in members]
    for name in names[:6] + [names[int(k)] for k in rng.choice(len(names), 8, replace=False)]:
        others = [(info.filename, blob) for info, blob in members if info.filename != name]
        out.append((f"entry {name} removed", _zip(others)))
        renamed = [(info.filename + ("x" if info.filename == name else ""), blob) for info, blob in members]
        out.append((f"entry {name} renamed", _zip(renamed)))
    out.append(("archive folder renamed", _zip([(f"other/{info.filename.split('/', 1)[1]}", blob)
                                                for info, blob in members])))
    out.append(("two data.pkl", _zip([(i.filename, b) for i, b in members] + [("second/data.pkl", pickle_bytes)])))
    out.append(("deflated archive (same content)", _zip([(i.filename, b) for i, b in members], zipfile.ZIP_DEFLATED)))
    out.append(("big-endian byteorder", _zip([(i.filename, b"big" if i.filename.endswith("byteorder") else b)
                                              for i, b in members])))
    tensor_name = next(info.filename for info, blob in members if "/data/" in info.filename and len(blob) >= 64)
    out.append(("tensor data cut short (valid CRC)", _zip([(i.filename, b[:-8] if i.filename == tensor_name else b)
                                                          for i, b in members])))
    out.append(("tensor data longer (valid CRC)", _zip([(i.filename, b + b"\0" * 8 if i.filename == tensor_name
                                                        else b) for i, b in members])))
    # zip bombs: a tensor member that inflates to 256 MiB, and a central directory declaring a 4 GiB entry
    out.append(("zip bomb: a tensor that inflates to 256 MiB", _zip_bomb(members, tensor_name, 256 << 20)))
    out.append(("zip bomb: a pickle that inflates to 256 MiB", _zip_bomb(members, pickle_info.filename, 256 << 20)))
    liar = bytearray(data)
    last = liar.rfind(b"PK\x01\x02")
    liar[last + 24: last + 28] = (2**32 - 2).to_bytes(4, "little")  # uncompressed size of the last entry
    out.append(("central directory declares a 4 GiB entry", bytes(liar)))
    for index in range(150):  # damage inside the pickle, re-zipped with valid CRCs: the unpickler and builder see it
        kind = index % 5
        if kind in (0, 1):
            payload, where = flipped(pickle_bytes, int(rng.integers(1, 4)), 0, len(pickle_bytes))
            what = f"pickle bytes flipped at {where}"
        elif kind == 2:
            start = int(rng.integers(0, len(pickle_bytes)))
            length = int(rng.integers(1, 200))
            payload, what = pickle_bytes[:start] + pickle_bytes[start + length:], f"pickle bytes {start}+{length} cut"
        elif kind == 3:
            start = int(rng.integers(0, len(pickle_bytes)))
            length = int(rng.integers(1, 200))
            payload = pickle_bytes[:start] + pickle_bytes[start: start + length] * 2 + pickle_bytes[start + length:]
            what = f"pickle bytes {start}+{length} doubled"
        else:
            cut = int(rng.integers(0, len(pickle_bytes)))
            payload, what = pickle_bytes[:cut], f"pickle truncated to {cut} bytes"
        out.append((what, _with_pickle(data, payload)))
    for what, payload in _hostile_pickles(marker).items():
        out.append((f"hostile pickle: {what}", _with_pickle(data, payload)))
    out.append(("not a zip: random bytes", bytes(rng.integers(0, 256, 4096, dtype=np.uint8))))
    out.append(("not a zip: HTML", b"<!DOCTYPE html><html>404</html>"))
    return out


def _zip_bomb(members, name: str, size: int) -> bytes:
    """The archive with member ``name`` replaced by ``size`` zero bytes, deflated (about 1000 to 1)."""
    chunk = b"\0" * (1 << 20)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as target:
        for info, blob in members:
            if info.filename != name:
                target.writestr(info.filename, blob)
                continue
            entry = zipfile.ZipInfo(name)
            entry.compress_type = zipfile.ZIP_DEFLATED
            with target.open(entry, "w", force_zip64=True) as stream:
                for _ in range(size >> 20):
                    stream.write(chunk)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------- worker


class _Timeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def worker(out_path: str) -> None:
    """Load every variant; one JSON line per variant: {case, outcome, detail, seconds}."""
    import torch

    from mace_ase.io.model_file import ModelFileError, read_model_file
    from mace_ase.model.build import hyperparameters, load_model

    signal.signal(signal.SIGALRM, _alarm)
    import resource

    # a regression that allocates wildly becomes a MemoryError here instead of a visit from the OOM killer
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    soft = 16 << 30 if hard == resource.RLIM_INFINITY else min(16 << 30, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    data = FIXTURE.read_bytes()
    intact = load_model(FIXTURE, device="cpu")
    summary = hyperparameters(read_model_file(FIXTURE))
    reference = {k: v.clone() for k, v in intact.state_dict().items()}
    with tempfile.TemporaryDirectory() as folder, open(out_path, "w") as log:
        marker = os.path.join(folder, "payload-ran")
        path = os.path.join(folder, "variant.model")
        for case, blob in variants(data, marker):
            with open(path, "wb") as handle:
                handle.write(blob)
            start = time.perf_counter()
            signal.alarm(SECONDS_PER_FILE)
            try:
                model = load_model(path, device="cpu")
                state = model.state_dict()
                same = (state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
                        and model.r_max_value == intact.r_max_value and list(model.heads) == list(intact.heads)
                        and torch.equal(model.atomic_numbers, intact.atomic_numbers))
                outcome, detail = (SAME, "") if same else ("DIFFERENT", "loaded but differs from the intact file")
            except _Timeout:
                outcome, detail = "HANG", f"more than {SECONDS_PER_FILE} s"
            except ModelFileError as exc:
                message = str(exc)
                outcome, detail = (CLEAN, message) if message.strip() else ("EMPTY-MESSAGE", repr(exc))
            except BaseException as exc:  # noqa: BLE001 - anything else is what the test reports
                outcome, detail = "RAW", f"{type(exc).__module__}.{type(exc).__name__}: {exc}"[:400]
            finally:
                signal.alarm(0)
            signal.alarm(SECONDS_PER_FILE)
            try:  # the other reader of files: `mace-ase models info` (hyperparameters)
                if outcome == SAME and hyperparameters(read_model_file(path)) != summary:
                    outcome, detail = "DIFFERENT", "hyperparameters differ from the intact file's"
                elif outcome != SAME:
                    hyperparameters(read_model_file(path))
            except _Timeout:
                outcome, detail = "HANG", f"hyperparameters: more than {SECONDS_PER_FILE} s"
            except ModelFileError:
                pass
            except BaseException as exc:  # noqa: BLE001
                outcome, detail = "RAW", f"hyperparameters: {type(exc).__module__}.{type(exc).__name__}: {exc}"[:400]
            finally:
                signal.alarm(0)
            if os.path.exists(marker):
                outcome, detail = "CODE-RAN", "a payload from the file ran"
            log.write(json.dumps({"case": case, "outcome": outcome, "detail": detail[:400],
                                  "seconds": round(time.perf_counter() - start, 3)}) + "\n")
            log.flush()


# ------------------------------------------------------------------------------------------------------- test


@pytest.mark.slow
def test_every_damaged_or_hostile_variant_loads_the_same_or_fails_clearly(tmp_path: Path) -> None:
    assert FIXTURE.is_file(), f"fixture {FIXTURE} is missing (tests/fixtures/make_fixtures.py)"
    out = tmp_path / "fuzz.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True,
                             timeout=600)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    last = rows[-1]["case"] if rows else "(none)"
    assert process.returncode == 0, (f"the fuzz loop died (exit {process.returncode}) after case {last!r}:\n"
                                     f"{process.stderr[-3000:]}")
    assert len(rows) >= 400
    bad = [row for row in rows if row["outcome"] not in (CLEAN, SAME)]
    assert not bad, "\n".join(f"{row['outcome']}: {row['case']}: {row['detail']}" for row in bad[:30])
    outcomes = {row["outcome"] for row in rows}
    assert outcomes == {CLEAN, SAME}  # some damage is harmless (zip padding, a re-zip), most is refused
    assert max(row["seconds"] for row in rows) < SECONDS_PER_FILE
    hostile = [row for row in rows if row["case"].startswith("hostile")]
    assert hostile and all(row["outcome"] == CLEAN for row in hostile)
    memo = next(row for row in rows if "memo slot 2**31" in row["case"])
    assert "memo slot 2147483647" in memo["detail"]  # refused by the pre-scan, not by running out of memory


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    worker(sys.argv[1])
