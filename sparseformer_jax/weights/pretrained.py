"""Pretrained SparseFormers in one call: `load_pretrained(name)` -> (model, variables).

The weights come from the official release (downloaded once into a cache and read without
PyTorch; see pth_reader), or from any `source`: an http(s):// or file:// URL, a local `.pth`,
the --out directory of scripts/convert_checkpoint.py, or a training workdir of main.py.
"""
import hashlib
import http.client
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Optional

import jax
import ml_collections
from etils import epath
from flax import traverse_util

from sparseformer_jax.models.config import VARIANTS, get_config
from sparseformer_jax.models.sparseformer import SparseFormer
from sparseformer_jax.trainer import checkpointing
from sparseformer_jax.weights import torch_checkpoint

_RELEASE = "https://github.com/showlab/sparseformer/releases/download/v2.0.0-refactor/"
# The official library's release files (its sparseformer/factory.py), one per image variant.
PRETRAINED_URLS = {name: f"{_RELEASE}{name}_converted.pth" for name in (
    "sparseformer_v1_tiny", "sparseformer_v1_small", "sparseformer_v1_base",
    "sparseformer_btsp_augreg_base", "sparseformer_btsp_augreg_large",
    "sparseformer_btsp_openai_clip_base", "sparseformer_btsp_openai_clip_large")}
CACHE_ENV = "SPARSEFORMER_JAX_CACHE"
DOWNLOAD_TIMEOUT_S = 60     # without a byte for this long, a download fails
MODEL_FILE = "model.json"   # next to a converted checkpoint: {"name", "overrides"}


class DownloadError(RuntimeError):
  """A download that failed; the message names the URL, why, and how to fetch it by hand."""


def default_cache_dir() -> str:
  """Where downloads are kept: $SPARSEFORMER_JAX_CACHE, else ~/.cache/sparseformer_jax."""
  return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache",
                                                    "sparseformer_jax")


def _cache_name(url: str) -> str:
  """<stem>-<8 hex of the URL><ext>: readable, and two URLs never share a file."""
  stem, ext = os.path.splitext(os.path.basename(urllib.parse.urlparse(url).path) or "download")
  return f"{stem}-{hashlib.sha256(url.encode()).hexdigest()[:8]}{ext}"


def _progress_printer(name: str, total: Optional[int]):
  """A function (bytes so far) that redraws 'name: 12.3/85.0 MB, 4.5 MB/s, ETA 16 s' on stderr."""
  start, last = time.monotonic(), [0.0]

  def show(done: int, final: bool = False):
    now = time.monotonic()
    if not final and now - last[0] < 0.2:
      return
    last[0] = now
    rate = done / max(now - start, 1e-6)
    line = f"\r{name}: {done / 1e6:.1f}" + (f"/{total / 1e6:.1f}" if total else "") + " MB"
    line += f", {rate / 1e6:.1f} MB/s"
    if total and not final:
      line += f", ETA {max(total - done, 0) / max(rate, 1.0):.0f} s"
    sys.stderr.write(line + ("\n" if final else "   "))
    sys.stderr.flush()

  return show


def download(url: str, directory: Optional[str] = None) -> str:
  """The path of `url`'s file in the cache, downloaded first if absent.

  Written to a temporary file renamed when complete, so an interrupted download never counts as
  cached; a progress bar when stderr is a terminal. Raises DownloadError.
  """
  directory = directory or default_cache_dir()
  target = os.path.join(directory, _cache_name(url))
  if os.path.exists(target):
    return target
  by_hand = (f"Download it by hand (e.g. curl -L -o {os.path.basename(target)} '{url}') and "
             "pass its path instead (source=PATH, or --weights PATH).")
  os.makedirs(directory, exist_ok=True)
  fd, partial = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(target)}.",
                                 suffix=".part")
  try:
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(
        url, timeout=DOWNLOAD_TIMEOUT_S) as response:
      total = int(response.headers.get("Content-Length") or 0) or None
      show = _progress_printer(os.path.basename(target), total) if sys.stderr.isatty() else None
      done = 0
      while chunk := response.read(1 << 20):
        out.write(chunk)
        done += len(chunk)
        if show:
          show(done)
      if show:
        show(done, final=True)
    if total is not None and done != total:
      raise DownloadError(f"{url}: the connection closed after {done} of {total} bytes. "
                          f"Try again, or: {by_hand}")
    os.replace(partial, target)
    return target
  except urllib.error.HTTPError as e:
    raise DownloadError(f"{url}: HTTP {e.code} {e.reason}. {by_hand}") from e
  except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
    reason = getattr(e, "reason", None) or e or type(e).__name__
    raise DownloadError(f"{url}: download failed ({reason}). {by_hand}") from e
  finally:
    if os.path.exists(partial):
      os.remove(partial)  # our own incomplete temporary file


def _check_fits(model: SparseFormer, params, name: str, source: str) -> None:
  """Raises ValueError naming every param whose presence or shape differs from the model's."""
  expected = {k: v.shape for k, v in torch_checkpoint.expected_params(model.config).items()}
  found = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(params).items()}
  wrong = [f"{'/'.join(k)}: {found.get(k, 'missing')} vs model {expected.get(k, 'absent')}"
           for k in sorted(set(expected) | set(found)) if expected.get(k) != found.get(k)]
  if wrong:
    raise ValueError(f"{source} does not fit {name!r}: {'; '.join(wrong[:8])}"
                     + (f" (+{len(wrong) - 8} more)" if len(wrong) > 8 else "") + ".")


def _single_device():
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _saved_params(path: str, ema: bool):
  return checkpointing.load_saved_params(path, _single_device(),
                                         "ema_params" if ema else "params")


def load_run(workdir: str, name: Optional[str] = None, *, ema: bool = False, **overrides):
  """(model, variables, config) of a main.py run: its config.json and latest checkpoint (the EMA
  params with ema=True); `name`, if given, must be the run's model; `overrides` are model fields
  (e.g. dtype)."""
  config = ml_collections.ConfigDict(json.loads((epath.Path(workdir) / "config.json").read_text()))
  if name and name != config.model.name:
    raise ValueError(f"{workdir} trained {config.model.name!r}, not {name!r}.")
  params = _saved_params(workdir, ema)
  saved = {k: v for k, v in config.model.overrides.to_dict().items() if v is not None}
  model = SparseFormer(get_config(config.model.name, **{
      "num_classes": params["head"]["kernel"].shape[-1], **saved, **overrides}))
  _check_fits(model, params, config.model.name, workdir)
  return model, {"params": params}, config


def write_model_file(directory: str, name: str, overrides: dict) -> None:
  """Records the variant and model fields of a converted checkpoint in <directory>/model.json."""
  path = epath.Path(directory) / MODEL_FILE
  partial = path.parent / f".{MODEL_FILE}.tmp"
  partial.write_text(json.dumps({"name": name, "overrides": overrides}, indent=1))
  partial.rename(path)


def _model_file(directory: str) -> Optional[dict]:
  """{'name', 'overrides'} that a convert_checkpoint.py --out directory records, if it does."""
  path = epath.Path(_local(directory)) / MODEL_FILE
  return json.loads(path.read_text()) if path.exists() else None


def converted_name(directory: str) -> Optional[str]:
  """The variant a convert_checkpoint.py --out directory records, if it does."""
  return (_model_file(directory) or {}).get("name")


def _local(source) -> str:
  """A file:// URL as a path; anything else unchanged."""
  source = os.fspath(source)
  parsed = urllib.parse.urlparse(source)
  return urllib.request.url2pathname(parsed.path) if parsed.scheme == "file" else source


def fetch(source, cache: Optional[str] = None) -> str:
  """A local path for `source`: an http(s):// URL downloaded (once) into the cache, a file://
  URL as its path, a path unchanged."""
  source = _local(source)
  if urllib.parse.urlparse(source).scheme in ("http", "https"):
    return download(source, cache)
  return source


def is_run(source) -> bool:
  """Whether `source` is a main.py workdir (it has a config.json)."""
  path = epath.Path(_local(source))
  return path.is_dir() and (path / "config.json").exists()


def load_converted(directory: str, name: Optional[str] = None, **overrides):
  """(model, variables) from a scripts/convert_checkpoint.py --out directory."""
  saved = _model_file(directory)
  if saved:
    if name and name != saved["name"]:
      raise ValueError(f"{directory} holds {saved['name']!r} weights, not {name!r}.")
    name, overrides = saved["name"], {**saved["overrides"], **overrides}
  elif not name:
    raise ValueError(f"{directory} has no {MODEL_FILE}; pass the model name it was converted for.")
  params = _saved_params(directory, ema=False)
  model = SparseFormer(get_config(name, **{"num_classes": params["head"]["kernel"].shape[-1],
                                           **overrides}))
  _check_fits(model, params, name, directory)
  return model, {"params": params}


def numerics_of(source, name: Optional[str] = None) -> dict:
  """The numerics fields (flavor, grad_clamp) that the weights at `source` were made to compute
  in: a variant name (its release file, library layout), a .pth or URL (its key layout), a
  convert_checkpoint.py --out directory (its model.json); {} where the weights do not say (a
  training workdir computes as its own config says)."""
  library = torch_checkpoint.LAYOUT_NUMERICS["library"]
  if source is None or (source in VARIANTS and not epath.Path(source).exists()):
    return dict(library)        # every official release file is in the library's layout
  path = fetch(source)
  if is_run(path) or not epath.Path(path).exists():
    return {}                   # a missing path is reported by whoever reads the weights
  if epath.Path(path).is_dir():
    saved = _model_file(path)
    if saved is None:
      return {}
    recorded = saved["overrides"]   # the fields that differ from the (library) defaults
    return {k: recorded.get(k, library[k]) for k in library}
  state_dict = torch_checkpoint._to_numpy_state_dict(path)  # pylint: disable=protected-access
  return dict(torch_checkpoint.LAYOUT_NUMERICS[torch_checkpoint.detect_layout(state_dict)])


def load_pretrained(name: Optional[str] = None, source=None, *, cache_dir: Optional[str] = None,
                    num_classes: Optional[int] = None, dtype: Optional[str] = None,
                    ema: bool = False, **overrides):
  """(model, variables) of pretrained weights, the model in the numerics flavor they were made in.

  name: a variant (sparseformer_jax.VARIANTS); optional for a workdir or converted directory,
    which record it. source: None (the official release file of `name`, downloaded once into
    `cache_dir`, default $SPARSEFORMER_JAX_CACHE or ~/.cache/sparseformer_jax), an http(s):// or
    file:// URL, a .pth file, a convert_checkpoint.py --out directory, or a main.py workdir (its
    latest checkpoint; the EMA params with ema=True). num_classes, dtype and `overrides` are model
    fields; num_classes must match the weights' head (fine-tune a new head with
    main.py --config.init_from=... --config.init_skip=head).
  """
  overrides = {**overrides, **({"num_classes": num_classes} if num_classes else {}),
               **({"dtype": dtype} if dtype else {})}
  if name is not None and name not in VARIANTS:
    raise ValueError(f"Unknown model {name!r}. Known models: {', '.join(sorted(VARIANTS))}.")
  if source is None:
    if name is None:
      raise ValueError("load_pretrained needs a model name or a source.")
    source = PRETRAINED_URLS[name]
  source = fetch(source, cache_dir)
  if is_run(source):
    return load_run(source, name, ema=ema, **overrides)[:2]
  if ema:
    raise ValueError(f"ema=True needs a training workdir; {source} is not one.")
  if epath.Path(source).is_dir():
    return load_converted(source, name, **overrides)
  if name is None:
    raise ValueError(f"Loading {source} needs the model name (e.g. sparseformer_v1_tiny).")
  return torch_checkpoint.load_torch_model(source, name, **overrides)
