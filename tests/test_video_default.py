"""configs/video_default.py: a valid video recipe without label-changing augmentation, and its
smoke run end to end through train.train_and_evaluate."""
import json

from conftest import by_step, read_metrics, run_python, smoke_config
from configs import video_default
from sparseformer_jax.trainer import config_schema

# Trains configs/video_default.py:smoke (the reference cadence: logs every 2 steps and
# checkpoints every 4 of its 12 steps) in the workdir sys.argv[1].
SMOKE_DRIVER = """
import sys
from conftest import smoke_config
from sparseformer_jax.trainer import train
train.train_and_evaluate(smoke_config('video_default'), sys.argv[1])
"""


def test_full_config_is_a_valid_video_recipe_that_keeps_directions():
  for config in (video_default.get_config(), video_default.get_config('smoke')):
    config_schema.validate_config(config)
    assert config.input.num_frames == 8 and config.image_key == 'video'
    assert config.model.overrides.video
    # The label is a direction: a flip or mixing clips would change it.
    assert config.input.hflip == 0 and config.input.augment == 'none'
    assert config.input.mixup == 0 and config.input.cutmix == 0


def test_smoke_run_trains_evaluates_and_checkpoints(main_env, tmp_path):
  run_python(main_env, SMOKE_DRIVER, str(tmp_path))
  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['dataset'] == 'synthetic_motion/smoke'
  assert config['model']['overrides']['video'] is True
  records = read_metrics(tmp_path)
  assert sorted(by_step(records, 'train/loss')) == [2, 4, 6, 8, 10, 12]
  for name in ('val/top1', 'val/top5', 'ema_val/top1', 'ema_val/top5'):
    assert sorted(by_step(records, name)) == [12], name  # one eval, at the end
  assert by_step(records, 'val/num_examples') == {12: 128}  # the whole smoke eval split
  checkpoints = tmp_path / 'checkpoints'
  assert sorted(int(p.name) for p in checkpoints.iterdir()) == [4, 8, 12]
  assert (checkpoints / '12' / 'commit_success.txt').exists()
