"""Entry point: python -m cfrl_jax.main --config=configs/demo.py [--config.rl.lr=1e-6 ...]

The config file's get_config() returns a locked ml_collections ConfigDict built
from cfrl_jax.config.base_config(), so every field can be overridden on the
command line and a misspelt key or a wrong type is an error listing the valid keys.
"""
from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).', lock_config=True)


def main(argv):
  del argv
  from cfrl_jax import experiment, parallel
  from cfrl_jax.config import check_against_schema
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config=configs/<experiment>.py is required, e.g. --config=configs/demo.py')
  check_against_schema(config)
  parallel.initialize_distributed()
  experiment.run(config)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
