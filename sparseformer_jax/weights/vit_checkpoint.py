"""Pretrained ViT weights (the teachers of bootstrapping) into our flax ViT (baselines/vit.py).

Three layouts, detected from the keys:
- 'big_vision': the `.npz` files of google-research/vision_transformer (AugReg) and big_vision,
  flattened flax paths such as 'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/
  query/kernel' (an optional 'params/' prefix; scanned 'encoderblock' stacks are unstacked);
- 'timm': a timm VisionTransformer state dict ('blocks.0.attn.qkv.weight');
- 'open_clip': an OpenCLIP / OpenAI CLIP image tower ('[visual.]transformer.resblocks.0...').
The structure (width, depth, patch, grid, pooling, head) is read from the shapes; what a layout
does not record (heads of the PyTorch layouts, QuickGELU) comes from the caller. Every flax leaf
names its source keys, so missing, unexpected and mis-shaped keys are found by one comparison.
"""
import math
import os
import re
from typing import Any, Callable, Dict, Mapping, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from sparseformer_jax.baselines.vit import ViT, ViTConfig
from sparseformer_jax.weights import torch_checkpoint

Path = Tuple[str, ...]
Source = Tuple[Tuple[str, ...], Callable[..., np.ndarray]]   # keys, and how they make the leaf

_TORCH_BLOCK = {
    "timm": {"attn_norm": "norm1", "attn/qkv": "attn.qkv", "attn/proj": "attn.proj",
             "mlp_norm": "norm2", "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2"},
    "open_clip": {"attn_norm": "ln_1", "attn/qkv": "attn.in_proj", "attn/proj": "attn.out_proj",
                  "mlp_norm": "ln_2", "mlp/fc1": "mlp.c_fc", "mlp/fc2": "mlp.c_proj"},
}
_TORCH_TOP = {
    "timm": {"patch_embed": "patch_embed.proj", "pre_norm": "norm_pre", "head": "head",
             "pos_embedding": "pos_embed", "cls_embedding": "cls_token"},
    "open_clip": {"patch_embed": "conv1", "pre_norm": "ln_pre", "head_norm": "ln_post",
                  "head": "proj", "pos_embedding": "positional_embedding",
                  "cls_embedding": "class_embedding"},
}
_TORCH_BLOCK_PREFIX = {"timm": "blocks.{}.", "open_clip": "transformer.resblocks.{}."}


def _identity(x):
  return x


def _transpose(x):
  return x.T


# ----------------------------------------------------------------------------------- reading


def _read_npz(path) -> Dict[str, np.ndarray]:
  with np.load(os.fspath(path), allow_pickle=False) as z:
    return {k: np.asarray(z[k], np.float32) for k in z.files}


def read_state(source) -> Dict[str, np.ndarray]:
  """Flat {key: float32 array} of a path (.npz, or a PyTorch file) or an in-memory mapping."""
  if isinstance(source, (str, os.PathLike)):
    if not os.path.exists(source):
      raise FileNotFoundError(f"No teacher checkpoint at {source}.")
    if os.fspath(source).endswith(".npz"):
      return _read_npz(source)
  return torch_checkpoint._to_numpy_state_dict(source)  # pylint: disable=protected-access


def _normalize(state: Mapping[str, np.ndarray]) -> Tuple[str, Dict[str, np.ndarray]]:
  """(layout, state with its layout's prefixes removed and scanned blocks unstacked)."""
  if any("/" in k for k in state):
    if any(k.startswith("params/") for k in state):   # big_vision: drop optimizer state
      state = {k[len("params/"):]: v for k, v in state.items() if k.startswith("params/")}
    out = {}
    for key, value in state.items():
      match = re.match(r"Transformer/encoderblock/(.*)", key)
      if match:   # a scanned stack (depth, ...) of identical blocks
        for i, block in enumerate(value):
          out[f"Transformer/encoderblock_{i}/{match.group(1)}"] = block
      else:
        out[key] = value
    return "big_vision", out
  if "visual.conv1.weight" in state:   # a whole CLIP model: its image tower
    state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
  if "conv1.weight" in state:
    return "open_clip", dict(state)
  if "patch_embed.proj.weight" in state:
    return "timm", dict(state)
  raise ValueError("Not a ViT checkpoint of a known layout: no 'embedding/kernel' (big_vision "
                   ".npz), 'patch_embed.proj.weight' (timm) or '[visual.]conv1.weight' (OpenCLIP)."
                   f" First keys: {list(state)[:8]}")


# ---------------------------------------------------------------------- structure from shapes


def _grid_rows(rows: int, class_row: bool) -> int:
  side = math.isqrt(rows - class_row)
  if side * side != rows - class_row:
    raise ValueError(f"A position embedding of {rows} rows is not a square patch grid"
                     f"{' plus a CLS row' if class_row else ''}.")
  return side


def _structure(layout: str, state: Mapping[str, np.ndarray]) -> Tuple[dict, int]:
  """(ViTConfig fields the checkpoint determines, grid side) from its key names and shapes."""
  if layout == "big_vision":
    kernel = state["embedding/kernel"]                                     # (p, p, 3, D)
    depth = len({k.split("/")[1] for k in state if k.startswith("Transformer/encoderblock_")})
    query = next(v for k, v in state.items()
                 if k.startswith("Transformer/encoderblock_0/") and k.endswith("query/kernel"))
    class_token = "cls" in state
    old_pos = "Transformer/posembed_input/pos_embedding" in state           # has the CLS row
    pos = state["Transformer/posembed_input/pos_embedding" if old_pos else "pos_embedding"]
    fields = dict(patch=kernel.shape[0], width=kernel.shape[-1], depth=depth,
                  num_heads=query.shape[1], class_token=class_token,
                  cls_position=class_token and old_pos, pool="cls" if class_token else "gap",
                  patch_bias="embedding/bias" in state, pre_norm=False, ln_eps=1e-6,
                  num_classes=state["head/kernel"].shape[-1] if "head/kernel" in state else 0,
                  head_bias="head/bias" in state)
    return fields, _grid_rows(pos.shape[-2], fields["cls_position"])
  top = _TORCH_TOP[layout]
  kernel = state[top["patch_embed"] + ".weight"]                           # (D, 3, p, p)
  prefix = _TORCH_BLOCK_PREFIX[layout].split("{")[0]
  depth = len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})
  pos = state[top["pos_embedding"]]
  class_token = top["cls_embedding"] in state
  rows = pos.shape[-2]
  cls_position = class_token and math.isqrt(rows) ** 2 != rows   # timm no_embed_class: square
  fc_norm = layout == "timm" and "fc_norm.weight" in state
  head = top["head"] + (".weight" if layout == "timm" else "")
  fields = dict(patch=kernel.shape[-1], width=kernel.shape[0], depth=depth,
                class_token=class_token, cls_position=cls_position,
                pool="gap_fc_norm" if fc_norm else "cls" if class_token else "gap",
                patch_bias=top["patch_embed"] + ".bias" in state,
                pre_norm=top["pre_norm"] + ".weight" in state,
                ln_eps=1e-5 if layout == "open_clip" else 1e-6,
                num_classes=(state[head].shape[0 if layout == "timm" else 1]
                             if head in state else 0),
                head_bias=layout == "timm" and "head.bias" in state)
  return fields, _grid_rows(rows, cls_position)


# ----------------------------------------------------------------------------- key mapping


def _big_vision_block_names(state, i: int) -> Dict[str, str]:
  """Our block module names -> the checkpoint's ('LayerNorm_0'/'_2', 'MlpBlock_3' in
  vision_transformer; '_0'/'_1', 'MlpBlock_0' in big_vision)."""
  prefix = f"Transformer/encoderblock_{i}/"
  modules = sorted({k[len(prefix):].split("/")[0] for k in state if k.startswith(prefix)})
  norms = sorted((m for m in modules if m.startswith("LayerNorm_")), key=lambda m: int(m[10:]))
  find = lambda stem: next((m for m in modules if m.startswith(stem)), stem + "?")
  norms += ["LayerNorm_?"] * (2 - len(norms))
  attn, mlp = find("MultiHeadDotProductAttention_"), find("MlpBlock_")
  return {"attn_norm": prefix + norms[0], "mlp_norm": prefix + norms[1],
          "attn": prefix + attn, "mlp/fc1": f"{prefix}{mlp}/Dense_0",
          "mlp/fc2": f"{prefix}{mlp}/Dense_1"}


def _big_vision_source(state, cfg: ViTConfig, path: Path) -> Source:
  leaf = path[-1]
  if path[0].startswith("block_"):
    names = _big_vision_block_names(state, int(path[0][6:]))
    inner = "/".join(path[1:-1])
    if inner == "attn/qkv":   # three (D, H, hd) kernels or (H, hd) biases -> one fused
      keys = tuple(f"{names['attn']}/{n}/{leaf}" for n in ("query", "key", "value"))
      return keys, lambda *qkv: np.concatenate([a.reshape(a.shape[0], -1) if leaf == "kernel"
                                                else a.reshape(-1) for a in qkv], axis=-1)
    if inner == "attn/proj":   # (H, hd, D) -> (D, D)
      return (f"{names['attn']}/out/{leaf}",), ((lambda a: a.reshape(-1, a.shape[-1]))
                                                if leaf == "kernel" else _identity)
    return (f"{names[inner]}/{leaf}",), _identity
  if path[0] == "pos_embedding":
    key = ("Transformer/posembed_input/pos_embedding" if cfg.cls_position else "pos_embedding")
    return (key,), lambda a: a.reshape(a.shape[-2:])
  module = {"patch_embed": "embedding", "cls_embedding": "cls", "head_norm":
            "Transformer/encoder_norm", "head": "head"}[path[0]]
  return ((module,) if len(path) == 1 else (f"{module}/{leaf}",)), _identity


def _torch_source(layout: str, cfg: ViTConfig, path: Path) -> Source:
  leaf = {"kernel": "weight", "scale": "weight"}.get(path[-1], path[-1])
  if path[0].startswith("block_"):
    inner = "/".join(path[1:-1])
    module = _TORCH_BLOCK_PREFIX[layout].format(path[0][6:]) + _TORCH_BLOCK[layout][inner]
    key = f"{module}_{leaf}" if module.endswith("in_proj") else f"{module}.{leaf}"
    return (key,), _transpose if path[-1] == "kernel" else _identity
  top = dict(_TORCH_TOP[layout])
  top.setdefault("head_norm", "fc_norm" if cfg.pool == "gap_fc_norm" else "norm")
  module = top[path[0]]
  if path[0] == "patch_embed" and path[-1] == "kernel":   # OIHW -> HWIO
    return (f"{module}.weight",), lambda a: a.transpose(2, 3, 1, 0)
  if path[0] == "pos_embedding":
    return (module,), lambda a: a.reshape(a.shape[-2:])
  if path[0] == "cls_embedding":
    return (module,), lambda a: a.reshape(1, 1, -1)
  if layout == "open_clip" and path[0] == "head":   # proj is (D, E): x @ proj
    return (module,), _identity
  return (f"{module}.{leaf}",), _transpose if path[-1] == "kernel" else _identity


def _expected_params(cfg: ViTConfig, grid: int) -> Dict[Path, Any]:
  size = grid * cfg.patch
  abstract = jax.eval_shape(lambda: ViT(cfg).init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  return flax.traverse_util.flatten_dict(abstract["params"])


def load_vit(source, *, activation: str = "gelu", num_heads: int = 0, **overrides):
  """(ViT, {'params'}, image size) of a pretrained ViT (path or mapping, any layout above).

  `activation` ('gelu' | 'quick_gelu': OpenAI CLIP) and `num_heads` (0: what the checkpoint
  records, else width // 64) say what the PyTorch layouts do not record; `overrides` set any
  other ViTConfig field. Raises ValueError listing missing, unexpected and mis-shaped keys.
  """
  layout, state = _normalize(read_state(source))
  fields, grid = _structure(layout, state)
  fields.setdefault("num_heads", num_heads or max(fields["width"] // 64, 1))
  if num_heads:
    fields["num_heads"] = num_heads
  cfg = ViTConfig(**{**fields, "activation": activation, "drop_path_rate": 0.0, **overrides})
  cfg = cfg.validate()
  params, missing, misshaped, used = {}, [], [], set()
  for path, leaf in _expected_params(cfg, grid).items():
    keys, make = (_big_vision_source(state, cfg, path) if layout == "big_vision"
                  else _torch_source(layout, cfg, path))
    absent = [k for k in keys if k not in state]
    if absent:
      missing.append(f"{', '.join(absent)} (for {'/'.join(path)}, shape {leaf.shape})")
      continue
    used.update(keys)
    value = make(*(state[k] for k in keys))
    if value.shape != leaf.shape:
      misshaped.append(f"{', '.join(keys)}: {value.shape} for {'/'.join(path)}, which is "
                       f"{leaf.shape}")
      continue
    params[path] = value
  unexpected = sorted(set(state) - used)
  if missing or unexpected or misshaped:
    raise ValueError(torch_checkpoint.mismatch_report(
        f"The {layout} ViT checkpoint does not fit a ViT with {fields}:", missing, unexpected,
        misshaped, "Supported: pre-LN ViTs with a CLS or average-pooled head (no pre-logits "
        "layer, layer scale, register tokens or attention pooling)."))
  return ViT(cfg), {"params": flax.traverse_util.unflatten_dict(params)}, grid * cfg.patch


def to_vision_transformer_npz(params, cfg: ViTConfig, path) -> None:
  """Writes our ViT's params as a google-research/vision_transformer `.npz` (atomically)."""
  if cfg.pre_norm or cfg.pool == "gap_fc_norm" or not cfg.patch_bias:
    raise ValueError("The vision_transformer layout has no pre-norm, fc_norm or unbiased patch "
                     "embedding; this ViT cannot be written in it.")
  flat = {}
  for key, value in flax.traverse_util.flatten_dict(jax.device_get(params)).items():
    value = np.asarray(value, np.float32)
    if key[0].startswith("block_"):
      prefix = f"Transformer/encoderblock_{key[0][6:]}/"
      inner, leaf = "/".join(key[1:-1]), key[-1]
      heads = (cfg.num_heads, cfg.width // cfg.num_heads)
      if inner == "attn/qkv":
        for name, part in zip(("query", "key", "value"), np.split(value, 3, axis=-1)):
          shape = (cfg.width, *heads) if leaf == "kernel" else heads
          flat[f"{prefix}MultiHeadDotProductAttention_1/{name}/{leaf}"] = part.reshape(shape)
        continue
      if inner == "attn/proj":
        flat[f"{prefix}MultiHeadDotProductAttention_1/out/{leaf}"] = (
            value.reshape(*heads, cfg.width) if leaf == "kernel" else value)
        continue
      module = {"attn_norm": "LayerNorm_0", "mlp_norm": "LayerNorm_2",
                "mlp/fc1": "MlpBlock_3/Dense_0", "mlp/fc2": "MlpBlock_3/Dense_1"}[inner]
      flat[f"{prefix}{module}/{leaf}"] = value
    elif key[0] == "pos_embedding":
      name = ("Transformer/posembed_input/pos_embedding" if cfg.cls_position else "pos_embedding")
      flat[name] = value[None]
    else:
      module = {"patch_embed": "embedding", "cls_embedding": "cls",
                "head_norm": "Transformer/encoder_norm", "head": "head"}[key[0]]
      flat["/".join((module,) + key[1:])] = value
  path = os.fspath(path)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **flat)
  os.replace(tmp, path)
