"""Bad configs and inputs fail before anything compiles, naming the field and the fix."""
import importlib

import pytest

from conftest import smoke_config
from sparseformer_jax.data import input_pipeline
from sparseformer_jax.trainer import config_schema
from sparseformer_jax.trainer import train
from sparseformer_jax.trainer.config_schema import ConfigError


def _set(config, dotted, value):
  *parents, leaf = dotted.split('.')
  for part in parents:
    config = config[part]
  config[leaf] = value


@pytest.mark.parametrize('field, value, message', [
    ('model.name', 'sparseformer_v9', "Unknown model 'sparseformer_v9'. Known models:"),
    ('model.overrides.padding', 'mirror', "padding='mirror': expected 'zeros' or 'border'"),
    ('dataset', 'no_such_dataset', "config.dataset='no_such_dataset': TFDS has no dataset"),
    ('dtype', 'float16', "config.dtype='float16' is not one of ('float32', 'bfloat16')"),
    ('optimizer.accum_steps', 0, 'config.optimizer.accum_steps=0 must be > 0'),
    ('global_batch_size', 30, 'config.global_batch_size=30 is not divisible by the 1 devices x 4 '
     'micro-batches: set --config.global_batch_size to a multiple of 4, e.g. 32'),
])
def test_bad_values_name_the_field(tmp_path, no_compiles, field, value, message):
  config = smoke_config()
  if field == 'global_batch_size':
    config.optimizer.accum_steps = 4
  _set(config, field, value)
  with pytest.raises(ConfigError) as error:
    train.train_and_evaluate(config, str(tmp_path))
  assert message in str(error.value)
  assert no_compiles() == 0


def test_unknown_and_missing_fields_of_programmatic_configs(tmp_path, no_compiles):
  config = smoke_config()
  config.optimizer.lr = 0.1
  with pytest.raises(ConfigError, match=r'config.optimizer.lr is not a known field. Did you mean '
                                        r'optimizer.base_lr\?'):
    train.train_and_evaluate(config, str(tmp_path))
  config = smoke_config()
  del config.input['cache']
  with pytest.raises(ConfigError, match='config.input.cache is missing'):
    train.train_and_evaluate(config, str(tmp_path))
  config = smoke_config()
  config.model.overrides.num_tokns = 4
  with pytest.raises(ConfigError, match='config.model.overrides.num_tokns is not a known field. '
                                        'Did you mean model.overrides.num_tokens'):
    train.train_and_evaluate(config, str(tmp_path))
  assert no_compiles() == 0


def test_device_count_checks_suggest_a_size_that_works():
  config = smoke_config()
  config.global_batch_size = 36
  with pytest.raises(ConfigError, match='multiple of 8, e.g. 40'):
    config_schema.check_against_devices(config, device_count=8)
  config.global_batch_size, config.eval_batch_size = 32, 60
  with pytest.raises(ConfigError, match='config.eval_batch_size=60 is not divisible by the 8 '
                                        'devices'):
    config_schema.check_against_devices(config, device_count=8)
  config.optimizer.accum_steps, config.sub_batches = 2, 4
  with pytest.raises(ConfigError, match='config.global_batch_size=32 is not divisible by the 8 '
                                        'devices x 2 micro-batches x 4 sub-batches: set '
                                        '--config.global_batch_size to a multiple of 64, e.g. 64'):
    config_schema.check_against_devices(config, device_count=8)
  config.global_batch_size, config.eval_batch_size = 64, 48
  with pytest.raises(ConfigError, match='config.eval_batch_size=48 is not divisible by the 8 '
                                        'devices x 4 sub-batches: .* e.g. 64'):
    config_schema.check_against_devices(config, device_count=8)
  config.eval_batch_size, config.mesh.fsdp = 64, 3
  with pytest.raises(ConfigError, match='config.mesh.fsdp=3 must divide the 8 devices'):
    config_schema.check_against_devices(config, device_count=8)


def test_an_unwritable_workdir_is_reported(tmp_path, no_compiles):
  (tmp_path / 'a_file').write_text('not a directory')
  with pytest.raises(ConfigError, match='is not writable .* pass a --workdir you can write to'):
    train.train_and_evaluate(smoke_config(), str(tmp_path / 'a_file' / 'run'))
  assert no_compiles() == 0


def test_eval_only_without_weights_is_reported(tmp_path, no_compiles):
  config = smoke_config()
  config.eval_only = True
  with pytest.raises(ConfigError, match='eval_only needs weights: .* set config.init_from'):
    train.train_and_evaluate(config, str(tmp_path))
  assert no_compiles() == 0


@pytest.mark.parametrize('fields, message', [
    (dict(init_skip='head'), 'init_skip names params not to take from config.init_from, which is '
                             'empty'),
    (dict(init_skip='head', init_from='/w', eval_only=True), 'init_skip leaves params freshly '
                                                             'initialized'),
])
def test_init_skip_without_fine_tuning_is_reported(fields, message):
  config = smoke_config()
  config.update(fields)
  with pytest.raises(ConfigError, match=message):
    config_schema.validate_config(config)


@pytest.mark.parametrize('name', ['default', 'sparseformer_t', 'sparseformer_s', 'sparseformer_b'])
@pytest.mark.parametrize('arg', ['', 'smoke'])
def test_every_config_and_its_smoke_variant_is_valid(name, arg):
  config = importlib.import_module(f'configs.{name}').get_config(arg)
  config_schema.validate_config(config)
  config_schema.check_against_devices(config, device_count=8)
  train._build_model(config, num_classes=10)  # pylint: disable=protected-access
  if arg == 'smoke':
    assert config.dataset == 'synthetic_objects/smoke' and config.num_train_steps <= 20


def test_fine_tuning_with_another_normalization_is_pointed_out():
  """A bootstrapped CLIP model fine-tuned on ImageNet-normalized inputs gets a warning with the
  flags that fix it; matching inputs, or no init_from, get none."""
  config = config_schema.base_config()
  config.model.name = 'sparseformer_btsp_openai_clip_base'
  assert config_schema.normalization_mismatch(config) is None     # trained from scratch
  config.init_from = '/converted/btsp_clip_base'
  message = config_schema.normalization_mismatch(config)
  assert "--config.input.mean='(0.48145466,0.4578275,0.40821073)'" in message
  assert "--config.input.std='(0.26862954,0.26130258,0.27577711)'" in message
  config.input.mean = (0.48145466, 0.4578275, 0.40821073)
  config.input.std = (0.26862954, 0.26130258, 0.27577711)
  assert config_schema.normalization_mismatch(config) is None
  config.model.name = 'sparseformer_v1_tiny'                          # ImageNet-normalized
  assert 'sparseformer_v1_tiny was trained' in config_schema.normalization_mismatch(config)


def test_a_smoke_run_beside_prepared_data_says_which_dataset_it_trains_on(tmp_path):
  (tmp_path / 'imagenet2012' / '5.1.0').mkdir(parents=True)
  (tmp_path / 'imagenet2012' / '5.1.0' / 'dataset_info.json').write_text('{}')
  config = smoke_config()
  assert input_pipeline.generated_beside_prepared(config) is None  # no data_dir: nothing to say
  config.data_dir = str(tmp_path)
  message = input_pipeline.generated_beside_prepared(config)
  assert message.startswith("config.dataset='synthetic_objects/smoke' is generated by this "
                            f'package, but config.data_dir {tmp_path} also holds imagenet2012')
  assert '--config.dataset=imagenet2012 --config.train_split=train[:512]' in message
  config.dataset = 'mnist'  # a dataset of TFDS's own: the user's choice, nothing to say
  assert input_pipeline.generated_beside_prepared(config) is None
