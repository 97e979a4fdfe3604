"""Reads PyTorch `.pth` files into numpy arrays without PyTorch, and without running their code.

A `.pth` is a pickle, and plain `pickle.load` calls whatever function the file names. This reader
unpickles with an allow-list: the few globals a state dict needs (an OrderedDict, the tensor and
parameter rebuild calls, the storage types) map to our own inert stand-ins; any other global is
refused with `UnsafeCheckpointError` before anything runs. Tensors come back as numpy arrays with
the dtype, shape, strides, offset and storage sharing that `torch.load` gives.

Both formats of `torch.save` are read: the zip archive (PyTorch >= 1.6: `<name>/data.pkl` whose
persistent ids point at raw storages `<name>/data/<key>`) and the older single stream (magic
number, protocol, system info, the pickle, the storage keys, then each storage's bytes).
"""
import collections
import os
import pickle
import zipfile
from typing import Any, BinaryIO, Callable, Dict

import ml_dtypes
import numpy as np

# The legacy format's stream starts with this number and protocol version.
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128, "UntypedStorage": np.uint8,
}


class CheckpointReadError(ValueError):
  """A file that is not a readable PyTorch checkpoint; the message names the file and why."""


class UnsafeCheckpointError(CheckpointReadError):
  """A checkpoint whose pickle names a global outside the allow-list (it could run code)."""


class _StorageType:
  """What `torch.FloatStorage` & co. unpickle to: just the element dtype."""

  def __init__(self, name: str):
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
  """One raw storage, shared by every tensor that views it; `array` is filled once read."""

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype, self.numel, self.array = dtype, numel, None


class _Tensor:
  """A tensor to build once its storage's bytes are known (the legacy format stores them last)."""

  def __init__(self, storage: _Storage, offset: int, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def to_numpy(self, path: str) -> np.ndarray:
    flat = self.storage.array
    if any(s < 0 for s in self.stride) or self.offset < 0:
      raise CheckpointReadError(f"{path}: a tensor has negative strides or offset; the file is "
                                "corrupt.")
    if 0 in self.size:
      return np.zeros(self.size, flat.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if last >= flat.size:
      raise CheckpointReadError(
          f"{path}: a tensor of shape {self.size} reaches element {last} of a storage of "
          f"{flat.size}; the file is truncated or corrupt.")
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=self.size,
        strides=[s * flat.itemsize for s in self.stride], writeable=False)
    return np.array(view)  # own, C-contiguous memory: a view must not alias its neighbours


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """torch._utils._rebuild_tensor(_v2): (storage, offset, size, stride[, grad, hooks, meta])."""
  return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, *unused):
  """torch._utils._rebuild_parameter(_with_state): a Parameter is its data."""
  return data


def _latin1_bytes(text, encoding="latin1"):
  """_codecs.encode, how protocol-2 pickles spell a bytes object; only the latin1 codec."""
  if encoding not in ("latin1", "latin-1"):
    raise UnsafeCheckpointError(f"_codecs.encode with encoding {encoding!r} is not allowed.")
  return text.encode("latin1")


def _numpy_scalar(dtype, data=None):
  """numpy's scalar reconstructor (e.g. an accuracy saved next to the weights)."""
  return np.frombuffer(data, dtype)[0] if data is not None else dtype.type()


_ALLOWED: Dict[tuple, Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("_codecs", "encode"): _latin1_bytes,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only allow-listed globals; persistent ids become `_Storage`s via `storage_for`."""

  def __init__(self, file: BinaryIO, path: str, storage_for: Callable[[tuple], _Storage]):
    super().__init__(file)
    self._path, self._storage_for = path, storage_for

  def find_class(self, module, name):
    if (module, name) not in _ALLOWED:
      raise UnsafeCheckpointError(
          f"{self._path}: refused: its pickle calls {module}.{name}, which a PyTorch state dict "
          "never needs and which could run code (nothing was run). Load only checkpoints you "
          "trust; to keep the weights of a trusted one, re-save its state dict with PyTorch.")
    return _ALLOWED[(module, name)]

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise CheckpointReadError(f"{self._path}: unexpected persistent id {pid!r:.80}; not a "
                                "PyTorch checkpoint this reader knows.")
    return self._storage_for(pid)


def _build(obj, path: str):
  """The unpickled structure with every pending tensor turned into a numpy array."""
  if isinstance(obj, _Tensor):
    return obj.to_numpy(path)
  if isinstance(obj, dict):
    return type(obj)((key, _build(value, path)) for key, value in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_build(value, path) for value in obj)
  return obj


def _read_zip(archive: zipfile.ZipFile, path: str):
  pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
  if not pickles:
    raise CheckpointReadError(f"{path}: a zip archive without data.pkl; not a torch.save file.")
  prefix = pickles[0][:-len("data.pkl")]
  byteorder = "little"
  if prefix + "byteorder" in archive.namelist():
    byteorder = archive.read(prefix + "byteorder").decode().strip()
  storages: Dict[str, _Storage] = {}

  def storage_for(pid):
    _, storage_type, key, _, numel = pid[:5]
    if key not in storages:  # one key = one storage, shared by all its views
      dtype = storage_type.dtype.newbyteorder("<" if byteorder == "little" else ">")
      storage = _Storage(dtype, numel)
      try:
        raw = archive.read(f"{prefix}data/{key}")
      except KeyError as e:
        raise CheckpointReadError(f"{path}: storage data/{key} is missing; the file is "
                                  "incomplete.") from e
      storage.array = np.frombuffer(raw, dtype)
      storages[key] = storage
    return storages[key]

  with archive.open(pickles[0]) as f:
    return _RestrictedUnpickler(f, path, storage_for).load()


def _read_legacy(f: BinaryIO, path: str):
  def load():
    return _RestrictedUnpickler(f, path, storage_for).load()

  storages: Dict[str, _Storage] = {}
  views = []

  def storage_for(pid):
    _, storage_type, key, _, numel, view = pid[:6]
    if key not in storages:
      storages[key] = _Storage(storage_type.dtype, numel)
    if view is None:
      return storages[key]
    _, view_offset, view_numel = view  # a view of a root storage, older torch versions
    sub = _Storage(storage_type.dtype, view_numel)
    views.append((sub, storages[key], view_offset))
    return sub

  if load() != _LEGACY_MAGIC:
    raise CheckpointReadError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a "
                              "legacy torch.save stream).")
  if load() != _LEGACY_PROTOCOL:
    raise CheckpointReadError(f"{path}: an unknown legacy torch.save protocol; re-save it with "
                              "a recent PyTorch (torch.save(torch.load(f), f2)).")
  little = load().get("little_endian", True)
  result = load()
  for key in load():
    storage = storages[key]
    count = int.from_bytes(f.read(8), "little" if little else "big")
    dtype = storage.dtype.newbyteorder("<" if little else ">")
    raw = f.read(count * dtype.itemsize)
    if len(raw) != count * dtype.itemsize:
      raise CheckpointReadError(f"{path}: the file ends inside storage {key}; it is truncated.")
    storage.array = np.frombuffer(raw, dtype)
  for sub, root, offset in views:
    sub.array = root.array[offset:offset + sub.numel]
  return result


def read_pth(path: str) -> Any:
  """The object saved in the `.pth` at `path`, every tensor a numpy array (bfloat16 as
  ml_dtypes.bfloat16). Raises CheckpointReadError (UnsafeCheckpointError for code)."""
  path = os.fspath(path)
  try:
    if os.path.getsize(path) == 0:
      raise CheckpointReadError(f"{path}: the file is empty (0 bytes); download it again.")
    with open(path, "rb") as f:
      is_zip = f.read(4) == b"PK\x03\x04"
    if is_zip:  # a zip cut short has lost its directory (at the end): BadZipFile
      with zipfile.ZipFile(path) as archive:
        result = _read_zip(archive, path)
    else:
      with open(path, "rb") as f:
        result = _read_legacy(f, path)
    return _build(result, path)
  except CheckpointReadError as e:
    if not str(e).startswith(path):  # raised by a stand-in that does not know the file
      raise type(e)(f"{path}: {e}") from e
    raise
  except FileNotFoundError as e:
    raise CheckpointReadError(f"{path}: no such file.") from e
  except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as e:
    raise CheckpointReadError(f"{path}: truncated or corrupt ({e or 'ends too early'}); "
                              "download it again.") from e
  except (pickle.UnpicklingError, ValueError, TypeError, KeyError, IndexError,
          AttributeError, UnicodeDecodeError) as e:
    raise CheckpointReadError(f"{path}: not a PyTorch checkpoint, or a corrupt one "
                              f"({type(e).__name__}: {e}).") from e
