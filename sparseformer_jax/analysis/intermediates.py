"""Reading a model's inner state: each unit's token RoIs, embeddings and sampling points.

Units `sow` them into the 'intermediates' collection after every repeat; `token_intermediates`
runs the model with that collection mutable and returns them in unit order.
"""
from typing import Any, Dict, List

import jax
import numpy as np


def token_intermediates(model, variables, images) -> Dict[str, Any]:
  """Runs `model` (train=False) and returns {'logits', 'features', 'units'}.

  'features': the stem output (B, h, w, C) ((B, T, h, w, C) for video). 'units': one dict per
  SFUnit in order ('focusing', 'cortex/unit_0', ...) with 'name' and stacked per-repeat arrays
  'rois' (R, B, N, 2D), 'embeddings' (R, B, N, width) and, for units that sample,
  'points' (R, B, N, P, D), all in normalized [0, 1] coordinates.
  """
  logits, state = model.apply(variables, images, train=False, mutable=["intermediates"])
  tree = state["intermediates"]
  units: List[Dict[str, Any]] = []

  def add(name, node):
    unit = {"name": name}
    for key in ("rois", "embeddings", "points"):
      if key in node:
        unit[key] = np.stack([np.asarray(v) for v in node[key]])
    units.append(unit)

  add("focusing", tree["focusing"])
  cortex = tree.get("cortex", {})
  for k in sorted((n for n in cortex if n.startswith("unit_")), key=lambda n: int(n[5:])):
    add(f"cortex/{k}", cortex[k])
  return {"logits": np.asarray(logits), "features": np.asarray(tree["features"][0]),
          "units": units}
