"""A bootstrapped SparseFormer's initial params from a pretrained ViT (CVPR 2024).

The student's plain ViT units (the cortex units after its sampling unit) take the teacher's LAST
blocks in order; its CLS embedding takes the teacher's (plus the position row the teacher adds to
it, as the student adds none); its head LayerNorm and head take the teacher's final norm and
classifier / CLIP projection. The stem, the focusing transformer, the transition and the sampling
unit have no ViT counterpart and stay fresh. The teacher's blocks from `first_frozen` on, its
final norm and head are frozen; the inherited blocks before them are fine-tuned.
"""
from typing import Dict, List, Tuple

import flax
import numpy as np

from sparseformer_jax.baselines.vit import ViTConfig
from sparseformer_jax.models.config import PLAIN_OPS, SparseFormerConfig

Path = Tuple[str, ...]


def vit_units(cfg: SparseFormerConfig) -> List[int]:
  """Indices k of the cortex units that are plain ViT blocks (attention + MLP only)."""
  return [k for k, (_, ops, _) in enumerate(cfg.unit_specs()[1:]) if tuple(ops) == PLAIN_OPS]


def inheritance(student: SparseFormerConfig, teacher: ViTConfig,
                first_frozen: int) -> Tuple[Dict[Path, Path], List[Path]]:
  """({student module path: teacher module path}, frozen student module paths).

  first_frozen < 0 means 2/3 of the teacher's depth (the paper's setting). Raises ValueError
  naming what does not fit before any weight is looked at.
  """
  problems = []
  units = vit_units(student)
  start = teacher.depth - len(units)
  if not units or units != list(range(units[0], student.cortex_depth)):
    problems.append("the student's cortex does not end in a run of plain ViT units (attn, mlp)")
  if start < 0:
    problems.append(f"the student has {len(units)} ViT units, the teacher only {teacher.depth} "
                    "blocks")
  heads = student.heads(student.cortex_width)
  if (student.cortex_width, heads) != (teacher.width, teacher.num_heads):
    problems.append(f"cortex width {student.cortex_width} with {heads} heads vs the teacher's "
                    f"{teacher.width} with {teacher.num_heads}")
  if ("quick_gelu" if student.quick_gelu else "gelu") != teacher.activation:
    problems.append(f"quick_gelu={student.quick_gelu} vs the teacher's {teacher.activation}")
  if not teacher.num_classes:
    problems.append("the teacher has no head (classifier or projection) to align with")
  if problems:
    raise ValueError("The ViT teacher cannot bootstrap this SparseFormer: " + "; ".join(problems)
                     + ". Set the student's cortex_width, cortex_depth (1 + the inherited blocks),"
                     " num_heads and quick_gelu to fit the teacher.")
  first_frozen = teacher.depth * 2 // 3 if first_frozen < 0 else first_frozen
  modules = {("cortex", f"unit_{k}"): (f"block_{start + i}",) for i, k in enumerate(units)}
  if teacher.class_token:
    modules[("cortex", "cls_embedding")] = ("cls_embedding",)
  modules[("head_norm",)] = ("head_norm",)
  modules[("head",)] = ("head",)
  frozen = [s for s, t in modules.items()
            if t[0].startswith("block_") and int(t[0][6:]) >= first_frozen]
  return modules, frozen + [("head_norm",), ("head",)]


def _teacher_value(teacher: ViTConfig, teacher_flat, path: Path) -> np.ndarray:
  value = np.asarray(teacher_flat[path])
  if path == ("cls_embedding",):   # (1, 1, D) + its position row -> the student's (1, D)
    value = value.reshape(1, -1)
    if teacher.cls_position:
      value = value + np.asarray(teacher_flat[("pos_embedding",)])[:1]
  return value


def inherit_from_vit(student_params, student: SparseFormerConfig, teacher_params,
                     teacher: ViTConfig, first_frozen: int = -1):
  """(params with the teacher's weights where they map, frozen module paths).

  Raises ValueError listing every student param the map covers but the teacher cannot fill
  (absent or of another shape).
  """
  modules, frozen = inheritance(student, teacher, first_frozen)
  flat = dict(flax.traverse_util.flatten_dict(student_params))
  teacher_flat = flax.traverse_util.flatten_dict(teacher_params)
  unmapped = []
  for path in list(flat):
    prefix = next((p for p in modules if path[:len(p)] == p), None)
    if prefix is None:
      continue   # fresh
    source = modules[prefix] + path[len(prefix):]
    if source not in teacher_flat:
      unmapped.append(f"{'/'.join(path)} <- {'/'.join(source)}: not in the teacher")
      continue
    value = _teacher_value(teacher, teacher_flat, source)
    if value.shape != flat[path].shape:
      unmapped.append(f"{'/'.join(path)} <- {'/'.join(source)}: teacher {value.shape}, student "
                      f"{flat[path].shape}")
      continue
    flat[path] = value
  if unmapped:
    raise ValueError(f"{len(unmapped)} student param(s) did not map from the ViT teacher:\n  "
                     + "\n  ".join(unmapped) + "\nCheck num_classes / head_bias against the "
                     "teacher's head.")
  return flax.traverse_util.unflatten_dict(flat), frozen
