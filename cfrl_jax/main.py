"""Entry point: python -m cfrl_jax.main --config=configs/demo.py [--config.rl.lr=1e-6 ...]

The config file's get_config() returns a locked ml_collections ConfigDict built
from cfrl_jax.config.base_config(), so every field can be overridden on the
command line and a misspelt key or a wrong type is an error listing the valid keys.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import sys

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from cfrl_jax.config import GET_CONFIG_FIELDS, check_against_schema, validate

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).', lock_config=True)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """configs/x.py[:arg] -> the ConfigDict its get_config([arg]) returns."""
  path, _, arg = spec.partition(':')
  if not os.path.exists(path):
    raise FileNotFoundError(f'Config file {path!r} does not exist (configs available: '
                            f'{sorted(os.listdir("configs")) if os.path.isdir("configs") else "none here"}).')
  module_spec = importlib.util.spec_from_file_location('cfrl_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if arg and not inspect.signature(module.get_config).parameters:
    raise ValueError(f'{path} takes no config argument, but {spec!r} passes {arg!r}; use --config={path}.')
  return module.get_config(arg) if arg else module.get_config()


def override_paths(argv: list[str]) -> list[str]:
  """The dotted config paths set on the command line (--config.a.b=v or --config.a.b v)."""
  return [a[len('--config.'):].split('=', 1)[0] for a in argv if a.startswith('--config.')]


def command_line_problem(argv: list[str]) -> str | None:
  """A message for the first --config.a.b=... that is not a field of the config, or that names a field
  only get_config reads (config.GET_CONFIG_FIELDS); else None. Raises for a bad --config=file[:arg]."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if spec is None:
    return None
  config = load_config_file(spec)
  for dotted in override_paths(argv):
    path = dotted.split('.')
    if dotted in GET_CONFIG_FIELDS:
      return (f'--config.{dotted} cannot be set on the command line: the config file reads it inside '
              f'get_config, before command-line values apply. Use the config argument instead, e.g. '
              f'--config={spec.partition(":")[0]}:{dotted}.')
    node, where = config, []
    for part in path:
      if isinstance(node, (ml_collections.ConfigDict, dict)) and part in node:
        node, where = node[part], where + [part]
        continue
      section = 'config' + ''.join('.' + w for w in where)
      valid = sorted(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
      return (f'Unknown config key --config.{".".join(path)}: {part!r} is not a field of {section}. '
              f'Valid keys of {section}: {valid}.')
  return None


def main(argv):
  del argv
  # Not at the top: importing main (load_config_file, command_line_problem) need not load the trainer.
  from cfrl_jax import distributed, experiment
  config = _CONFIG.value
  try:
    check_against_schema(config)
    validate(config)
    # absl hands main only the arguments it did not parse, so the overrides come from sys.argv.
    explicit = frozenset(override_paths(sys.argv[1:]))
    if config.arms and not config.alpharl.enabled:
      experiment.study_jobs(config, explicit)   # arms, explicit settings and each arm's values, before any work
  except ValueError as e:
    sys.exit(f'error: {e}')
  # orbax logs every checkpoint step at INFO through absl, which buries the progress bars.
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  distributed.initialize_distributed()
  if config.compile_cache_dir:
    import jax
    jax.config.update('jax_compilation_cache_dir', os.path.abspath(config.compile_cache_dir))
  experiment.run(config, explicit)


def run():
  try:
    problem = command_line_problem(sys.argv[1:])
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  if problem:
    sys.exit(f'error: {problem}')
  flags.mark_flag_as_required('config')
  app.run(main)


if __name__ == '__main__':
  run()
