"""Safe reader of official MACE ``.model`` files.

An official MACE file is a whole ``torch.nn.Module`` written by ``torch.save``: a zip archive holding
``<arch>/data.pkl`` (a pickle, protocol 2) and one raw little-endian blob per tensor storage under
``<arch>/data/<key>``. Unpickling it the normal way imports mace and e3nn and *executes code from the file*
(e3nn's ``__setstate__`` runs ``torch.jit.load``; torch.fx's ``reduce_graph_module`` ``exec``s stored source).

This reader never does that. A restricted unpickler rebuilds

* tensors, from the storage blobs (``torch.frombuffer``; no code involved),
* plain containers (dict, list, tuple, set, OrderedDict, bytes),
* every mace / e3nn / ``torch.nn`` object as an inert :class:`PickledObject` record that keeps the
  pickled ``__dict__`` (``_parameters``, ``_buffers``, ``_modules`` and plain attributes) and its class name,
* e3nn's ``Irreps`` / ``Instruction`` tuples as tuple records, functions such as ``silu`` as :class:`FunctionRef`.

Anything else named in the pickle (``os.system``, ``builtins.eval``, ...) raises :class:`ModelFileError`
before it can be called. See ``shared/docs/mace-reference.md`` section 3 for the format.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from typing import Any, Iterator

import torch

log = logging.getLogger(__name__)

__all__ = ["ModelFileError", "PickledObject", "FunctionRef", "ModelFile", "read_model_file", "directory_message"]


class ModelFileError(ValueError):
    """The file is not a MACE model file this package can read safely."""


_MAX_MODULE_DEPTH = 64  # official files nest modules about 6 deep
_MAX_RATIO = 100  # largest uncompressed/compressed size of a member (torch stores members uncompressed: 1)


# ---------------------------------------------------------------------------------------------------------------
# Inert records standing in for the pickled classes
# ---------------------------------------------------------------------------------------------------------------


class PickledObject:
    """An object from the file, reduced to data: its original class name and its pickled ``__dict__``.

    For ``torch.nn.Module`` records, :attr:`parameters`, :attr:`buffers` and :attr:`modules` give the
    usual views; other attributes are reached with :meth:`get`.
    """

    __qualname_in_file__ = "?"

    def __new__(cls, *args: Any) -> "PickledObject":  # NEWOBJ may pass constructor args; they are not needed
        self = super().__new__(cls)
        self.__dict__["_state"] = {}
        return self

    def __setstate__(self, state: Any) -> None:
        # nn.Module pickles its __dict__; some objects pickle (dict, slotstate) pairs.
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            merged = dict(state[0] or {})
            merged.update(state[1] or {})
            state = merged
        if not isinstance(state, dict):
            raise ModelFileError(f"unexpected pickled state of type {type(state).__name__} for {self.class_name}")
        self.__dict__["_state"] = state

    # pickle's BUILD without __setstate__ would touch __dict__ directly; we always go through __setstate__.

    @property
    def class_name(self) -> str:
        return type(self).__qualname_in_file__

    @property
    def short_class_name(self) -> str:
        return self.class_name.rsplit(".", 1)[-1]

    @property
    def state(self) -> dict:
        return self.__dict__["_state"]

    def get(self, name: str, default: Any = None) -> Any:
        return self.state.get(name, default)

    @property
    def parameters(self) -> dict:
        return {k: v for k, v in (self.state.get("_parameters") or {}).items() if v is not None}

    @property
    def buffers(self) -> dict:
        return {k: v for k, v in (self.state.get("_buffers") or {}).items() if v is not None}

    @property
    def modules(self) -> dict:
        return dict(self.state.get("_modules") or {})

    def tensor(self, name: str) -> torch.Tensor:
        """A parameter or buffer by name (raises ModelFileError naming the object when missing)."""
        value = self.parameters.get(name, self.buffers.get(name))
        if value is None:
            value = self.state.get(name)
        if not isinstance(value, torch.Tensor):
            raise ModelFileError(f"{self.short_class_name} has no tensor {name!r}")
        return value

    def module(self, name: str) -> "PickledObject":
        """A child module by name; ``a.b.0`` paths are allowed."""
        node: PickledObject = self
        for part in name.split("."):
            child = node.modules.get(part)
            if child is None:
                raise ModelFileError(f"{node.short_class_name} has no submodule {part!r} (looking for {name!r})")
            node = child
        return node

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "PickledObject"]]:
        """Every module below this one (depth first, each once, as torch's ``named_modules``).

        Iterative with a memo, so that a damaged file whose modules form a cycle or share children (2**60 paths
        in a few kB) costs one visit per module; deeper than ``_MAX_MODULE_DEPTH`` is refused.
        """
        seen: set[int] = set()
        stack: list[tuple[str, PickledObject, int]] = [(prefix, self, 0)]
        while stack:
            name, module, depth = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            if depth > _MAX_MODULE_DEPTH:
                raise ModelFileError(f"modules nested deeper than {_MAX_MODULE_DEPTH} levels at {name[:200]!r}")
            yield name, module
            children = [(key, child) for key, child in module.modules.items() if isinstance(child, PickledObject)]
            for key, child in reversed(children):
                stack.append((f"{name}.{key}" if name else str(key), child, depth + 1))

    def __repr__(self) -> str:
        return f"<record of {self.class_name}>"


class TupleRecord(tuple):
    """e3nn ``Irrep`` / ``_MulIr`` / ``Irreps``: tuple subclasses pickled as ``cls.__new__(cls, tuple_value)``."""

    def __new__(cls, *args: Any) -> "TupleRecord":
        value = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        return super().__new__(cls, value)

    def __setstate__(self, state: Any) -> None:  # tuple subclasses may carry an (empty) __dict__
        pass


class FieldsRecord(tuple):
    """e3nn ``Instruction`` named tuples: pickled as ``cls.__new__(cls, *fields)``."""

    def __new__(cls, *fields: Any) -> "FieldsRecord":
        return super().__new__(cls, fields)

    def __setstate__(self, state: Any) -> None:
        pass


@dataclass(frozen=True)
class FunctionRef:
    """A function named in the file (for example the readout gate ``torch.nn.functional.silu``); never called."""

    qualname: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ModelFileError(f"refusing to call {self.qualname} from a model file")


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


class _GraphModuleRecord(PickledObject):
    """torch.fx GraphModule (its stored Python source is kept as data and never executed)."""

    __qualname_in_file__ = "torch.fx.graph_module.GraphModule"


# ---------------------------------------------------------------------------------------------------------------
# What the unpickler may resolve
# ---------------------------------------------------------------------------------------------------------------

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}

# Modules whose classes become inert records (data only).
_RECORD_MODULE_PREFIXES = ("mace.", "e3nn.", "torch.nn.modules.", "torch.fx._symbolic_trace", "cuequivariance")

# Functions that appear as attribute values (activation functions): kept as names only.
_FUNCTION_NAMES = {
    "torch.nn.functional.silu",
    "torch.nn.functional.relu",
    "torch.nn.functional.gelu",
    "torch.nn.functional.softplus",
    "torch.tanh",
    "torch.sigmoid",
    "torch.abs",
    "torch.nn.functional.tanh",
    "torch.nn.functional.sigmoid",
    "torch._C._nn.silu",
    "torch._C._nn.gelu",
}

_TUPLE_CLASSES = {"e3nn.o3._irreps.Irrep", "e3nn.o3._irreps._MulIr", "e3nn.o3._irreps.Irreps"}
_FIELD_TUPLE_CLASSES = {"e3nn.o3._linear.Instruction", "e3nn.o3._tensor_product._instruction.Instruction"}


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: Any, stride: Any, *rest: Any) -> torch.Tensor:
    if not isinstance(storage, torch.Tensor):
        raise ModelFileError(f"a tensor is built from a {type(storage).__name__}, not from stored data")
    size, stride = _integers(size, "size"), _integers(stride, "stride")
    offset = _integers((offset,), "offset")[0]
    if len(size) != len(stride):
        raise ModelFileError(f"a tensor has size {size} but strides {stride}")
    if 0 in size:
        return storage.new_empty(size)
    elements = 1
    for extent in size:
        elements *= extent
    last = offset + sum((extent - 1) * step for extent, step in zip(size, stride))
    if last >= storage.numel() or elements > max(storage.numel(), 1):  # out of its data, or overlapping views
        raise ModelFileError(f"a tensor of size {list(size)[:8]}, strides {list(stride)[:8]} and offset {offset} "
                             f"does not fit its stored data of {storage.numel()} elements")
    return torch.as_strided(storage, size, stride, offset)


def _integers(values: Any, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or len(values) > 64 or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**62 for v in values):
        raise ModelFileError(f"a tensor has an invalid {what}: {values!r:.100}")
    return tuple(values)


def _rebuild_parameter(data: torch.Tensor, *rest: Any) -> torch.Tensor:
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    # Used for tensors that carry Python attributes; func is one of our rebuild functions.
    return func(*args)


def _codecs_encode(text: str, encoding: str = "latin1") -> bytes:
    # protocol-2 pickles encode `bytes` as _codecs.encode(str, "latin1")
    if encoding not in ("latin1", "latin-1"):
        raise ModelFileError(f"unexpected byte encoding {encoding!r} in model file")
    return text.encode("latin1")


def _reduce_graph_module(body: dict, import_block: str = "") -> _GraphModuleRecord:
    record = _GraphModuleRecord()
    record.__setstate__({"_body_keys": sorted(body) if isinstance(body, dict) else []})
    return record


_SAFE_CALLABLES = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.fx.graph_module", "reduce_graph_module"): _reduce_graph_module,
    ("_codecs", "encode"): _codecs_encode,
    ("collections", "OrderedDict"): dict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("torch", "Size"): tuple,
    ("torch._tensor", "Tensor"): torch.Tensor,  # used only as a type marker by _rebuild_from_type_v2
    ("torch.nn.parameter", "Parameter"): torch.Tensor,
}

_DTYPE_NAMES = {"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, load_storage: Any) -> None:
        super().__init__(file, encoding="latin1")
        self._load_storage = load_storage
        self._record_classes: dict[str, type] = {}

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise ModelFileError(f"unexpected persistent id in model file: {pid!r:.80}")
        storage_type, key, _location, numel = pid[1], pid[2], pid[3], pid[4]
        if not isinstance(storage_type, _StorageType):
            raise ModelFileError(f"unexpected storage type in model file: {storage_type!r:.80}")
        return self._load_storage(str(key), storage_type.dtype, int(numel))

    def find_class(self, module: str, name: str) -> Any:
        qualname = f"{module}.{name}"
        if (module, name) in _SAFE_CALLABLES:
            return _SAFE_CALLABLES[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _DTYPE_NAMES:
            return getattr(torch, name)  # a dtype object: plain data
        if module == "torch" and name == "device":
            return str  # torch.device("cpu") -> "cpu"
        if qualname in _FUNCTION_NAMES:
            return FunctionRef(qualname)
        if qualname in _TUPLE_CLASSES:
            return self._record_class(qualname, TupleRecord)
        if qualname in _FIELD_TUPLE_CLASSES:
            return self._record_class(qualname, FieldsRecord)
        if module.startswith(_RECORD_MODULE_PREFIXES) or qualname.startswith(_RECORD_MODULE_PREFIXES):
            return self._record_class(qualname, PickledObject)
        raise ModelFileError(
            f"model file references {qualname!r}, which is not part of a MACE model; refusing to load it "
            "(the file may be corrupted or malicious)"
        )

    def _record_class(self, qualname: str, base: type) -> type:
        cls = self._record_classes.get(qualname)
        if cls is None:
            cls = type(qualname.rsplit(".", 1)[-1], (base,), {"__qualname_in_file__": qualname})
            self._record_classes[qualname] = cls
        return cls


# ---------------------------------------------------------------------------------------------------------------
# The archive
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFile:
    """What an official ``.model`` file holds, as data.

    Attributes:
        path: the file read.
        root: the record of the pickled top-level module (for example ``mace.modules.models.ScaleShiftMACE``).
    """

    path: str
    root: PickledObject

    @property
    def class_name(self) -> str:
        return self.root.class_name

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All parameters and persistent buffers, keyed like ``torch.nn.Module.state_dict()``."""
        out: dict[str, torch.Tensor] = {}
        for prefix, module in self.root.named_modules():
            skip = set(module.get("_non_persistent_buffers_set") or ())
            for name, value in list(module.parameters.items()) + list(module.buffers.items()):
                if name in skip or not isinstance(value, torch.Tensor):
                    continue
                out[f"{prefix}.{name}" if prefix else name] = value
        return out


def _unpickle(archive: zipfile.ZipFile, pickle_name: str) -> Any:
    prefix = pickle_name[: -len("data.pkl")]
    names = set(archive.namelist())
    storages: dict[str, torch.Tensor] = {}

    byteorder_name = f"{prefix}byteorder"
    if byteorder_name in names and _read_member(archive, byteorder_name).decode("latin1").strip() != "little":
        raise ModelFileError("model file was written on a big-endian machine; this is not supported")

    def load_storage(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        cached = storages.get(key)
        if cached is None:
            member = f"{prefix}data/{key}"
            if member not in names:
                raise ModelFileError(f"model file lacks tensor data {member!r}: the file is truncated or damaged")
            expected = numel * torch.empty(0, dtype=dtype).element_size()
            declared = archive.getinfo(member).file_size
            if numel < 0 or declared != expected:
                raise ModelFileError(f"tensor data {member!r} holds {declared} bytes, but the pickle declares "
                                     f"{numel} elements of {dtype} ({expected} bytes)")
            raw = bytearray(_read_member(archive, member))
            if len(raw) != expected:
                raise ModelFileError(f"tensor data {member!r} holds {len(raw)} bytes, expected {expected}")
            if numel == 0 or len(raw) == 0:
                cached = torch.empty(0, dtype=dtype)
            else:
                cached = torch.frombuffer(raw, dtype=dtype)
            storages[key] = cached
        return cached

    data = _read_member(archive, pickle_name)
    _prescan(data)
    return _RestrictedUnpickler(io.BytesIO(data), load_storage).load()


_MEMO_OPCODES = {"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"}


def _prescan(data: bytes) -> None:
    """Walk the pickle's opcodes (no objects are made) before unpickling.

    The C unpickler sizes its memo table from the largest memo index it meets, so a damaged pickle naming index
    1.3e9 would allocate ~10 GB (and a Linux machine's OOM killer would end the process); an index beyond the
    pickle's length cannot occur in a real file. ``pickletools.genops`` also refuses lengths that run past the data.
    """
    import pickletools

    limit = len(data)
    try:
        for opcode, argument, position in pickletools.genops(data):
            if opcode.name in _MEMO_OPCODES and isinstance(argument, int) and not 0 <= argument <= limit:
                raise ModelFileError(f"the pickle names memo slot {argument} at byte {position}, beyond anything "
                                     f"a {limit}-byte pickle can hold")
    except ModelFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged opcode stream, in any way genops finds
        raise ModelFileError(f"the file is corrupted or not a mace model: {type(exc).__name__}: "
                             f"{str(exc)[:300]}") from None


def _read_member(archive: zipfile.ZipFile, name: str) -> bytes:
    """A member's bytes, refusing one that would inflate far beyond its stored size (a zip bomb)."""
    info = archive.getinfo(name)
    if info.file_size > _MAX_RATIO * info.compress_size + (1 << 20):
        raise ModelFileError(f"{name!r} declares {info.file_size} bytes from {info.compress_size} stored bytes "
                             "(a zip bomb?)")
    return archive.read(info)


# What zipfile may raise on a damaged archive (bad headers, names that are not UTF-8, unknown zip versions, ...).
_ARCHIVE_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError,
                   IndexError, KeyError, OverflowError, RuntimeError, struct.error)


def directory_message(path: str | os.PathLike) -> str:
    """What to tell a user who passed a directory where a ``.model`` file was expected."""
    path = os.fspath(path)
    try:
        inside = sorted(name for name in os.listdir(path) if name.endswith(".model"))
    except OSError:
        inside = []
    hint = (f" It holds {', '.join(inside[:5])}{', ...' if len(inside) > 5 else ''}; pass one of those, e.g. "
            f"{os.path.join(path, inside[0])!r}." if inside else " It holds no .model file.")
    return (f"{path!r} is a directory, not a model file: pass the path of a .model file (or, to mace_mp() and "
            f"friends, a catalogue name from `mace-ase models list`).{hint}")


def read_model_file(path: str | os.PathLike) -> ModelFile:
    """Read an official MACE ``.model`` file without executing anything from it.

    Args:
        path: path of a file written by mace-torch (``torch.save(model)``).

    Returns:
        a :class:`ModelFile` whose ``root`` is the inert record of the pickled model.

    Raises:
        ModelFileError: the file is missing, not a torch zip archive, truncated, or names anything outside
            the classes a MACE model is made of (for example a pickle payload calling ``os.system``).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ModelFileError(directory_message(path))
    if not os.path.isfile(path):
        raise ModelFileError(f"model file {path!r} does not exist")
    try:
        archive = zipfile.ZipFile(path)
    except _ARCHIVE_ERRORS as exc:
        with open(path, "rb") as handle:
            head = handle.read(64).lstrip().lower()
        hint = (
            " It looks like an HTML page (a failed download?)." if head.startswith((b"<!doctype", b"<html")) else ""
        )
        raise ModelFileError(
            f"{path!r} is not a torch model archive ({exc}).{hint} Re-download the model or check the path."
        ) from None
    with archive:
        pickles = [name for name in archive.namelist() if name.endswith("data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise ModelFileError(
                f"{path!r} is a zip file but not a torch.save archive (expected one '<name>/data.pkl', found "
                f"{len(pickles)})"
            )
        try:
            root = _unpickle(archive, pickles[0])
        except ModelFileError as exc:
            raise ModelFileError(f"{path!r}: {exc}") from None
        except MemoryError:
            raise ModelFileError(f"{path!r}: the file is corrupted or not a mace model: it declares more data "
                                 "than fits in memory") from None
        except RecursionError:
            raise ModelFileError(f"{path!r}: the file is corrupted or not a mace model: its data is nested too "
                                 "deeply") from None
        except Exception as exc:  # noqa: BLE001 - whatever a damaged archive or pickle makes the readers raise
            raise ModelFileError(f"{path!r}: the file is corrupted or not a mace model: {type(exc).__name__}: "
                                 f"{str(exc)[:300]}") from exc
    if not isinstance(root, PickledObject):
        raise ModelFileError(
            f"{path!r} holds a {type(root).__name__}, not a pickled MACE model (a state_dict or a training "
            "checkpoint?). Export the model with mace-torch (torch.save(model)) first."
        )
    log.debug("read %s: %s", path, root.class_name)
    return ModelFile(path=path, root=root)
