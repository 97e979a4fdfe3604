r"""Exports a SparseFormer for serving: a jax.export program, a TF SavedModel and a JSON card.

  python scripts/export.py --model sparseformer_v1_tiny --out exported/sf_t \
      --platforms cpu,cuda,tpu --resolution 224          # the official weights (downloaded once)
  python scripts/export.py --model sparseformer_v1_tiny --weights workdirs/sf_t \
      --out exported/mine                                # a training workdir

--weights takes what load_pretrained takes: nothing (the official release file of --model), an
http(s)/file URL, a .pth, scripts/convert_checkpoint.py's --out, or a training workdir. The batch
dimension of both programs is symbolic; H x W is fixed by --resolution. How to serve them:
README, "Serving".
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
from benchmark import parse_resolution
from sparseformer_jax import export
from sparseformer_jax import load_pretrained
from sparseformer_jax.predict import imagenet_class_names
from sparseformer_jax.models.config import parse_overrides


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True, help="variant name, e.g. sparseformer_v1_tiny")
  parser.add_argument("--weights", default=None, help="as load_pretrained's source; default: "
                      "the official release file of --model")
  parser.add_argument("--out", required=True, help="directory for the artifacts (new)")
  parser.add_argument("--platforms", default="cpu",
                      help="comma-separated, of " + ",".join(export.PLATFORMS))
  parser.add_argument("--resolution", type=parse_resolution, default=(224, 224),
                      help="H or HxW in pixels")
  parser.add_argument("--num-frames", type=int, default=0, help="video models: clip length")
  parser.add_argument("--class-names", default="",
                      help="a text file with one class name per line, for the JSON card")
  parser.add_argument("--override", action="append", default=[],
                      help="model config field=value (repeatable), e.g. num_classes=10")
  return parser.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  class_names = None
  if args.class_names:
    with open(args.class_names, encoding="utf-8") as f:
      class_names = [line.strip() for line in f if line.strip()]
  platforms = [p.strip() for p in args.platforms.split(",")]
  try:
    export.check_arguments(args.out, platforms)   # before the weights are read
    model, variables = load_pretrained(args.model, args.weights,
                                       **parse_overrides(args.override))
    if class_names is None and not model.config.video and model.config.num_classes == 1000:
      class_names = imagenet_class_names()   # the official ImageNet-1K heads
    card = export.export_model(model, variables, args.out, name=args.model,
                               resolution=args.resolution,
                               platforms=platforms,
                               num_frames=args.num_frames,
                               class_names=class_names)
  except (ValueError, OSError, RuntimeError) as e:  # bad weights, download, arguments, --out
    sys.exit(f"export: {e}")
  print(f"Wrote {args.out}: {export.EXPORT_FILE} ({', '.join(card['platforms'])}), "
        f"{export.SAVED_MODEL_DIR}/, {export.CARD_FILE}")
  return card


if __name__ == "__main__":
  main()
