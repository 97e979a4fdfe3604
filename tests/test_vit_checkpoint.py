"""Pretrained-ViT loading: a tiny ViT written in each layout (vision_transformer / big_vision
.npz, timm and OpenCLIP .pth) must give the logits of an independent numpy forward pass."""
import math

import numpy as np
import pytest
import torch

from sparseformer_jax.baselines.vit import ViTConfig
from sparseformer_jax.weights.vit_checkpoint import load_vit, to_vision_transformer_npz

WIDTH, HEADS, DEPTH, PATCH, GRID, CLASSES = 32, 2, 2, 8, 4, 5


def canonical(seed=0, cls_row=True, class_token=True):
  """Random weights in one neutral layout: torch conventions (Linear (out, in), conv OIHW)."""
  rng = np.random.default_rng(seed)
  r = lambda *shape: rng.normal(0, 0.2, shape).astype(np.float32)
  blocks = [dict(ln1=(1 + r(WIDTH), r(WIDTH)), q=r(WIDTH, WIDTH), k=r(WIDTH, WIDTH),
                 v=r(WIDTH, WIDTH), bq=r(WIDTH), bk=r(WIDTH), bv=r(WIDTH), o=r(WIDTH, WIDTH),
                 bo=r(WIDTH), ln2=(1 + r(WIDTH), r(WIDTH)), fc1=r(4 * WIDTH, WIDTH),
                 b1=r(4 * WIDTH), fc2=r(WIDTH, 4 * WIDTH), b2=r(WIDTH)) for _ in range(DEPTH)]
  return dict(patch=r(WIDTH, 3, PATCH, PATCH), patch_b=r(WIDTH), cls=r(WIDTH),
              pos=r(GRID * GRID + (cls_row and class_token), WIDTH), pre=(1 + r(WIDTH), r(WIDTH)),
              blocks=blocks, norm=(1 + r(WIDTH), r(WIDTH)), head=r(CLASSES, WIDTH),
              head_b=r(CLASSES), class_token=class_token, cls_row=cls_row)


def _ln(x, gb, eps):
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * gb[0] + gb[1]


def reference_forward(w, images, *, pool="cls", pre_norm=False, quick_gelu=False,
                      patch_bias=True, head_bias=True, eps=1e-6):
  """The textbook ViT on NHWC images, float64."""
  w = {k: (np.asarray(v, np.float64) if isinstance(v, np.ndarray) else v) for k, v in w.items()}
  b, h, wd, _ = images.shape
  patches = images.reshape(b, h // PATCH, PATCH, wd // PATCH, PATCH, 3).transpose(0, 1, 3, 5, 2, 4)
  x = patches.reshape(b, -1, 3 * PATCH * PATCH) @ w["patch"].reshape(WIDTH, -1).T
  if patch_bias:
    x = x + w["patch_b"]
  if not w["cls_row"]:
    x = x + w["pos"]
  if w["class_token"]:
    x = np.concatenate([np.broadcast_to(w["cls"], (b, 1, WIDTH)), x], 1)
  if w["cls_row"]:
    x = x + w["pos"]
  if pre_norm:
    x = _ln(x, w["pre"], eps)
  hd = WIDTH // HEADS
  for blk in w["blocks"]:
    y = _ln(x, blk["ln1"], eps)
    q, k, v = ((y @ blk[n].T + blk["b" + n]).reshape(b, -1, HEADS, hd).transpose(0, 2, 1, 3)
               for n in "qkv")
    a = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
    a = np.exp(a - a.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    y = (a @ v).transpose(0, 2, 1, 3).reshape(b, -1, WIDTH)
    x = x + y @ blk["o"].T + blk["bo"]
    y = _ln(x, blk["ln2"], eps) @ blk["fc1"].T + blk["b1"]
    if quick_gelu:
      y = y / (1 + np.exp(-1.702 * y))
    else:
      y = 0.5 * y * (1 + np.vectorize(math.erf)(y / math.sqrt(2)))
    x = x + y @ blk["fc2"].T + blk["b2"]
  tokens = x[:, int(w["class_token"]):]
  x = {"cls": lambda: _ln(x[:, 0], w["norm"], eps),
       "gap": lambda: _ln(tokens, w["norm"], eps).mean(1),
       "gap_fc_norm": lambda: _ln(tokens.mean(1), w["norm"], eps)}[pool]()
  return x @ w["head"].T + (w["head_b"] if head_bias else 0)


def big_vision_npz(w, path, *, old_names=True):
  """Writes w as vision_transformer (old_names) or big_vision module names."""
  mha, ln2, mlp = ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3") if old_names \
      else ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
  hd = WIDTH // HEADS
  flat = {"embedding/kernel": w["patch"].transpose(2, 3, 1, 0), "embedding/bias": w["patch_b"],
          "Transformer/encoder_norm/scale": w["norm"][0],
          "Transformer/encoder_norm/bias": w["norm"][1],
          "head/kernel": w["head"].T, "head/bias": w["head_b"]}
  if w["class_token"]:
    flat["cls"] = w["cls"].reshape(1, 1, WIDTH)
  flat["Transformer/posembed_input/pos_embedding" if w["cls_row"] else "pos_embedding"] = \
      w["pos"][None]
  for i, blk in enumerate(w["blocks"]):
    p = f"Transformer/encoderblock_{i}/"
    flat.update({p + "LayerNorm_0/scale": blk["ln1"][0], p + "LayerNorm_0/bias": blk["ln1"][1],
                 p + f"{ln2}/scale": blk["ln2"][0], p + f"{ln2}/bias": blk["ln2"][1],
                 p + f"{mha}/out/kernel": blk["o"].T.reshape(HEADS, hd, WIDTH),
                 p + f"{mha}/out/bias": blk["bo"],
                 p + f"{mlp}/Dense_0/kernel": blk["fc1"].T, p + f"{mlp}/Dense_0/bias": blk["b1"],
                 p + f"{mlp}/Dense_1/kernel": blk["fc2"].T, p + f"{mlp}/Dense_1/bias": blk["b2"]})
    for n, name in zip("qkv", ("query", "key", "value")):
      flat[p + f"{mha}/{name}/kernel"] = blk[n].T.reshape(WIDTH, HEADS, hd)
      flat[p + f"{mha}/{name}/bias"] = blk["b" + n].reshape(HEADS, hd)
  np.savez(path, **({k if old_names else "params/" + k: v for k, v in flat.items()}))


def timm_pth(w, path, fc_norm=False):
  sd = {"patch_embed.proj.weight": w["patch"], "patch_embed.proj.bias": w["patch_b"],
        "cls_token": w["cls"].reshape(1, 1, WIDTH), "pos_embed": w["pos"][None],
        ("fc_norm" if fc_norm else "norm") + ".weight": w["norm"][0],
        ("fc_norm" if fc_norm else "norm") + ".bias": w["norm"][1],
        "head.weight": w["head"], "head.bias": w["head_b"]}
  for i, blk in enumerate(w["blocks"]):
    p = f"blocks.{i}."
    sd.update({p + "norm1.weight": blk["ln1"][0], p + "norm1.bias": blk["ln1"][1],
               p + "attn.qkv.weight": np.concatenate([blk["q"], blk["k"], blk["v"]]),
               p + "attn.qkv.bias": np.concatenate([blk["bq"], blk["bk"], blk["bv"]]),
               p + "attn.proj.weight": blk["o"], p + "attn.proj.bias": blk["bo"],
               p + "norm2.weight": blk["ln2"][0], p + "norm2.bias": blk["ln2"][1],
               p + "mlp.fc1.weight": blk["fc1"], p + "mlp.fc1.bias": blk["b1"],
               p + "mlp.fc2.weight": blk["fc2"], p + "mlp.fc2.bias": blk["b2"]})
  torch.save({"model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}},
             path)


def open_clip_pth(w, path):
  sd = {"visual.conv1.weight": w["patch"], "visual.class_embedding": w["cls"],
        "visual.positional_embedding": w["pos"], "visual.ln_pre.weight": w["pre"][0],
        "visual.ln_pre.bias": w["pre"][1], "visual.ln_post.weight": w["norm"][0],
        "visual.ln_post.bias": w["norm"][1], "visual.proj": w["head"].T,
        "logit_scale": np.ones(()), "token_embedding.weight": np.zeros((3, 4))}  # text tower
  for i, blk in enumerate(w["blocks"]):
    p = f"visual.transformer.resblocks.{i}."
    sd.update({p + "ln_1.weight": blk["ln1"][0], p + "ln_1.bias": blk["ln1"][1],
               p + "attn.in_proj_weight": np.concatenate([blk["q"], blk["k"], blk["v"]]),
               p + "attn.in_proj_bias": np.concatenate([blk["bq"], blk["bk"], blk["bv"]]),
               p + "attn.out_proj.weight": blk["o"], p + "attn.out_proj.bias": blk["bo"],
               p + "ln_2.weight": blk["ln2"][0], p + "ln_2.bias": blk["ln2"][1],
               p + "mlp.c_fc.weight": blk["fc1"], p + "mlp.c_fc.bias": blk["b1"],
               p + "mlp.c_proj.weight": blk["fc2"], p + "mlp.c_proj.bias": blk["b2"]})
  torch.save({"state_dict": {k: torch.from_numpy(np.ascontiguousarray(v, np.float32))
                             for k, v in sd.items()}}, path)


def images(n=2, seed=1):
  return np.random.default_rng(seed).normal(0, 1, (n, GRID * PATCH, GRID * PATCH, 3)).astype(
      np.float32)


def check(source, want_kwargs, w, **load_kwargs):
  model, variables, size = load_vit(source, **load_kwargs)
  assert size == GRID * PATCH
  x = images()
  got = np.asarray(model.apply(variables, x))
  np.testing.assert_allclose(got, reference_forward(w, x.astype(np.float64), **want_kwargs),
                             atol=2e-4, rtol=0)
  return model.config


@pytest.mark.parametrize("old_names", [True, False])
def test_vision_transformer_and_big_vision_npz_match_the_reference(tmp_path, old_names):
  w = canonical(cls_row=old_names)   # big_vision adds no position to the CLS token
  big_vision_npz(w, tmp_path / "vit.npz", old_names=old_names)
  cfg = check(tmp_path / "vit.npz", {}, w)
  assert (cfg.width, cfg.depth, cfg.num_heads, cfg.patch, cfg.num_classes) == (
      WIDTH, DEPTH, HEADS, PATCH, CLASSES)
  assert cfg.cls_position == old_names and cfg.pool == "cls"


def test_big_vision_gap_model_without_class_token(tmp_path):
  w = canonical(class_token=False, cls_row=False)
  big_vision_npz(w, tmp_path / "gap.npz", old_names=False)
  assert check(tmp_path / "gap.npz", dict(pool="gap"), w).pool == "gap"


@pytest.mark.parametrize("fc_norm", [False, True])
def test_timm_state_dict_matches_the_reference(tmp_path, fc_norm):
  w = canonical()
  timm_pth(w, tmp_path / "vit.pth", fc_norm)
  cfg = check(tmp_path / "vit.pth", dict(pool="gap_fc_norm" if fc_norm else "cls"), w,
              num_heads=HEADS)
  assert cfg.pool == ("gap_fc_norm" if fc_norm else "cls")


def test_open_clip_image_tower_matches_the_reference(tmp_path):
  w = canonical()
  open_clip_pth(w, tmp_path / "clip.pt")
  cfg = check(tmp_path / "clip.pt", dict(pre_norm=True, quick_gelu=True, patch_bias=False,
                                         head_bias=False, eps=1e-5), w,
              activation="quick_gelu", num_heads=HEADS)
  assert cfg.pre_norm and not cfg.head_bias and cfg.num_classes == CLASSES


def test_a_checkpoint_that_does_not_fit_lists_its_keys(tmp_path):
  w = canonical()
  big_vision_npz(w, tmp_path / "vit.npz")
  with np.load(tmp_path / "vit.npz") as z:
    flat = {k: z[k] for k in z.files}
  flat["pre_logits/kernel"] = np.zeros((WIDTH, WIDTH), np.float32)
  del flat["Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"]
  with pytest.raises(ValueError, match=r"(?s)1 missing key.*Dense_1/bias.*1 unexpected.*"
                                       r"pre_logits/kernel"):
    load_vit(flat)


def test_our_vit_written_as_vision_transformer_npz_loads_back_the_same(tmp_path):
  w = canonical()
  big_vision_npz(w, tmp_path / "vit.npz")
  model, variables, _ = load_vit(tmp_path / "vit.npz")
  to_vision_transformer_npz(variables["params"], model.config, tmp_path / "again.npz")
  again, variables2, _ = load_vit(tmp_path / "again.npz")
  assert again.config == model.config
  x = images()
  np.testing.assert_array_equal(again.apply(variables2, x), model.apply(variables, x))
  with pytest.raises(ValueError, match="cannot be written"):
    to_vision_transformer_npz(variables["params"], ViTConfig(pre_norm=True), tmp_path / "x.npz")
