"""Loads the official PyTorch SparseFormer weights (both key layouts, docs/model.md §5) into flax
params.

The flax parameter tree is the source of truth: every flax leaf names the torch key it comes from
(`torch_key`), so missing, unexpected and mis-shaped keys are all found by one comparison.
"""
import os
import re
from typing import Any, Dict, Mapping, Tuple, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np

from sparseformer_jax.models.config import SparseFormerConfig, get_config
from sparseformer_jax.models.sparseformer import SparseFormer
from sparseformer_jax.weights import pth_reader

LAYOUTS = {"imagenet": "token_roi.weight", "library": "initial_roi.weight"}
# The numerics each layout's code computes in: the imagenet codebase always clamps the sampling
# points' gradient, the library's v1 flavor never does (docs/model.md §3).
LAYOUT_NUMERICS = {"imagenet": dict(flavor="imagenet", grad_clamp=True),
                   "library": dict(flavor="library", grad_clamp=False)}

_UNIT_MODULES = {
    "roi_adjust/norm": "roi_adjust_module.0",
    "roi_adjust/fc": "roi_adjust_module.1",
    "offsets/norm": "roi_offset_module.0",
    "offsets/proj": "roi_offset_module.1",
    "mixing/norm": "adaptive_mixing.parameter_generator.0",
    "mixing/fc1": "adaptive_mixing.parameter_generator.1",
    "mixing/fc2": "adaptive_mixing.parameter_generator.2",
    "pe_norm": "pe_transition.0",
    "pe_proj": "pe_transition.1",
}
_LAYOUT_UNIT_MODULES = {
    "imagenet": {"attn_norm": "ln_attn", "attn/proj": "attn.out_proj", "mlp_norm": "ffn.0",
                 "mlp/fc1": "ffn.1", "mlp/fc2": "ffn.3", "mixing/out_proj": "adaptive_mixing.tuo_proj"},
    "library": {"attn_norm": "norm1", "attn/qkv": "attn.qkv", "attn/proj": "attn.proj",
                "mlp_norm": "norm2", "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2",
                "mixing/out_proj": "adaptive_mixing.out_proj"},
}
_UNIT_PARAMS = {"offsets/bias": "roi_offset_bias", "mixing/m_beta": "adaptive_mixing.m_beta",
                "mixing/s_beta": "adaptive_mixing.s_beta", "stage_embedding": "stage_embedding.weight"}
_TOP = {
    "imagenet": {"initial_roi": "token_roi.weight", "initial_embedding": "token_embedding.weight",
                 "head_norm": "head.norm", "head": "head.classifier"},
    "library": {"initial_roi": "initial_roi.weight", "initial_embedding": "initial_embedding.weight",
                "head_norm": "norm", "head": "proj"},
}


def detect_layout(state_dict: Mapping[str, Any]) -> str:
  """'imagenet' or 'library' from the keys of an (unwrapped) official state dict."""
  for layout, key in LAYOUTS.items():
    if key in state_dict:
      return layout
  raise ValueError("Not an official SparseFormer state dict: it has neither 'token_roi.weight' "
                   "(imagenet codebase) nor 'initial_roi.weight' (library). First keys: "
                   f"{list(state_dict)[:8]}")


def _unit_index(cfg: SparseFormerConfig, path: Tuple[str, ...]) -> Tuple[int, Tuple[str, ...]]:
  """Index in the official `layers` list and the path inside the unit."""
  transition = 1 if cfg.cortex_width != cfg.focusing_width else 0
  if path[0] == "focusing":
    return 0, path[1:]
  k = int(path[1].split("_")[1])
  return 1 + transition + k, path[2:]


def torch_key(cfg: SparseFormerConfig, layout: str, path: Tuple[str, ...]) -> str:
  """The official state-dict key holding the flax parameter at `path`."""
  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}.get(path[-1], path[-1])
  if path[0] in ("focusing", "cortex") and path[-1] != "cls_embedding":
    index, inner = _unit_index(cfg, path)
    inner_name = "/".join(inner[:-1])
    if "/".join(inner) in _UNIT_PARAMS:
      return f"layers.{index}.{_UNIT_PARAMS['/'.join(inner)]}"
    if layout == "imagenet" and inner_name == "attn/qkv":
      return f"layers.{index}.attn.in_proj_{leaf}"
    if inner_name == "roi_adjust/proj":
      module = "roi_adjust_module.3" if cfg.roi_adjust_mlp else "roi_adjust_module.1"
    else:
      module = {**_UNIT_MODULES, **_LAYOUT_UNIT_MODULES[layout]}[inner_name]
    return f"layers.{index}.{module}.{leaf}"
  name = path[0]
  if name == "stem":
    return f"feat_extractor.conv1.{leaf}"
  if name == "cortex":
    return "cls_embedding.weight"
  if name in ("transition", "transition_norm"):
    return f"layers.1.{0 if name == 'transition' else 1}.{leaf}"
  top = _TOP[layout][name]
  return top if top.endswith(".weight") else f"{top}.{leaf}"


def to_flax(path: Tuple[str, ...], tensor: np.ndarray) -> np.ndarray:
  """Converts a torch tensor to the flax layout: Linear (out, in) -> (in, out); conv OIHW or
  OI1HW -> HWIO."""
  if path[-1] == "kernel" and path[0] == "stem":
    tensor = tensor[:, :, 0] if tensor.ndim == 5 else tensor
    return np.transpose(tensor, (2, 3, 1, 0))
  if path[-1] == "kernel":
    return tensor.T
  return tensor


def _to_numpy_state_dict(source) -> Dict[str, np.ndarray]:
  """A path (read without PyTorch, see pth_reader) or an in-memory state dict (torch tensors or
  numpy), unwrapped from {'model': ...}."""
  if isinstance(source, (str, os.PathLike)):
    path, source = os.fspath(source), pth_reader.read_pth(source)
    if not isinstance(source, Mapping):
      raise pth_reader.CheckpointReadError(
          f"{path}: holds a {type(source).__name__}, not a state dict (a mapping of names to "
          "tensors).")
  for wrapper in ("model", "state_dict", "model_ema"):
    if isinstance(source, Mapping) and wrapper in source and isinstance(source[wrapper], Mapping):
      source = source[wrapper]
      break
  out = {}
  for key, value in source.items():
    key = re.sub(r"^module\.", "", key)   # DistributedDataParallel prefix
    if hasattr(value, "detach"):
      value = value.detach().cpu().float().numpy()
    out[key] = np.asarray(value, dtype=np.float32)
  return out


def expected_params(cfg: SparseFormerConfig):
  """{flax param path: ShapeDtypeStruct} of the model `cfg` describes (nothing computed)."""
  shape = (1, 1, 32, 32, 3) if cfg.video else (1, 32, 32, 3)
  model = SparseFormer(cfg)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
  return flax.traverse_util.flatten_dict(abstract["params"])


def checkpoint_config(state_dict: Mapping[str, Any], name: str, **overrides) -> SparseFormerConfig:
  """The config matching a checkpoint: the variant, the layout's numerics flavor, the head's
  class count (unless `overrides` give num_classes), overrides."""
  layout = detect_layout(state_dict)
  fields = LAYOUT_NUMERICS[layout]
  cfg = get_config(name, **{**fields, **overrides})
  head = state_dict.get(torch_key(cfg, layout, ("head", "kernel")))
  if "num_classes" not in overrides and head is not None and head.ndim == 2:
    cfg = get_config(name, **{**fields, "num_classes": head.shape[0], **overrides})
  return cfg


def load_torch_checkpoint(source: Union[str, os.PathLike, Mapping[str, Any]], name: str,
                          **overrides) -> Dict[str, Any]:
  """{'params': ...} from an official checkpoint (path or state dict, either layout).

  `name` is the variant and `overrides` its config fields (e.g. num_classes, video=True). The
  layout is detected from the keys. Raises ValueError listing missing, unexpected and mis-shaped
  keys when the checkpoint does not fit the model.
  """
  state_dict = _to_numpy_state_dict(source)
  cfg = checkpoint_config(state_dict, name, **overrides)
  layout = detect_layout(state_dict)
  expected = expected_params(cfg)
  params, missing, misshaped = {}, [], []
  used = set()
  for path, leaf in expected.items():
    key = torch_key(cfg, layout, path)
    if key not in state_dict:
      missing.append(f"{key} (for {'/'.join(path)}, shape {leaf.shape})")
      continue
    used.add(key)
    value = to_flax(path, state_dict[key])
    if value.shape != leaf.shape:
      misshaped.append(f"{key}: checkpoint {state_dict[key].shape} -> {value.shape}, model "
                       f"expects {leaf.shape} (for {'/'.join(path)})")
      continue
    params[path] = value
  unexpected = sorted(set(state_dict) - used)
  if missing or unexpected or misshaped:
    raise ValueError(mismatch_report(
        f"The {layout}-layout checkpoint does not fit {name!r} with "
        f"{overrides or 'no overrides'}:", missing, unexpected, misshaped,
        "Check the model name and overrides (num_classes, num_tokens, video=True, ...)."))
  return {"params": flax.traverse_util.unflatten_dict(params)}


def mismatch_report(header: str, missing, unexpected, misshaped, advice: str) -> str:
  """The message of a checkpoint that does not fit: every missing, unexpected and mis-shaped
  key under its count, then what to check."""
  lines = [header]
  for title, items in (("missing", missing), ("unexpected", unexpected),
                       ("mis-shaped", misshaped)):
    if items:
      lines.append(f"  {len(items)} {title} key(s):")
      lines.extend(f"    {item}" for item in items)
  return "\n".join(lines + [advice])


def load_torch_model(source, name: str, **overrides):
  """(model, variables) for an official checkpoint, the model using the layout's numerics."""
  state_dict = _to_numpy_state_dict(source)
  cfg = checkpoint_config(state_dict, name, **overrides)
  variables = load_torch_checkpoint(state_dict, name, **{**overrides, "flavor": cfg.flavor,
                                                         "grad_clamp": cfg.grad_clamp,
                                                         "num_classes": cfg.num_classes})
  return SparseFormer(cfg), variables
