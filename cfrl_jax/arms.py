"""A study's arms: named variations of one config, given as override maps.

An arm is a dict {'section.field': value}. The built-in arms below are generated
from two small tables (algorithms x variants), so every control exists for every
policy-gradient algorithm by the same rule, not by copies. A config adds its own
arms as nested maps under `config.study.arms`:

    c.study.arms = {'grpo_lr1e4': {'rl': {'algorithm': 'grpo', 'lr': 1e-4}, 'cfrl': {'enabled': False}}}

and `--config.arms=grpo,grpo_lr1e4` picks among built-in and config-defined arms.

The CF-RL controls (Tomihari 2026 attributes the speed-up to training the head first; a
larger stage-one head lr is a confound):
  <alg>            plain RL, one learning-rate schedule for all parameters
  cf<alg>          CF-RL: stage one trains only the head at cfrl.stage1_head_lr, then all
  <alg>_headlr     plain RL whose head lr follows cf<alg>'s head schedule step by step
                   (the backbone trains from step 1): "the head gets a bigger step" alone
  cf<alg>_samelr   CF-RL with the stage-one head lr equal to the stage-two head lr: ordering alone
  cf<alg>_adaptive CF-RL whose stage one ends when the NTK says the head's share of the probe
                   log-prob change fell below cfrl.switch_threshold (capped by max_stage1_steps)
"""
from __future__ import annotations

import copy

import ml_collections as mc

from cfrl_jax.rl import algorithms

# The algorithms that have CF-RL variants and controls (the algorithm table's cfrl_arms), and the
# variants: name template -> overrides.
_CF_ALGORITHMS = tuple(name for name, alg in algorithms.TABLE.items() if alg.cfrl_arms)
_VARIANTS = {
    '{alg}': {'cfrl.enabled': False, 'rl.head_lr_schedule': 'constant'},
    'cf{alg}': {'cfrl.enabled': True},
    '{alg}_headlr': {'cfrl.enabled': False, 'rl.head_lr_schedule': 'cfrl_stage1'},
    # cfrl.stage1_head_lr < 0 means "the stage-two head lr" (config.py).
    'cf{alg}_samelr': {'cfrl.enabled': True, 'cfrl.stage1_head_lr': -1.0},
    # Stage one ends when the head's share of the probe log-prob change falls below cfrl.switch_threshold.
    'cf{alg}_adaptive': {'cfrl.enabled': True, 'cfrl.switch_on': 'head_share'},
}
BUILTIN_ARMS = {
    name.format(alg=alg): {'rl.algorithm': alg, **overrides}
    for alg in _CF_ALGORITHMS for name, overrides in _VARIANTS.items()
}
# Every other algorithm as itself, without CF-RL.
BUILTIN_ARMS.update({name: {'rl.algorithm': name, 'cfrl.enabled': False} for name in algorithms.ALGORITHMS
                     if name not in _CF_ALGORITHMS})
BUILTIN_ARMS['lpft'] = {'rl.algorithm': 'sft', 'cfrl.enabled': True}   # linear probing, then full fine-tuning


def _flatten(tree, prefix: str = '') -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, (mc.ConfigDict, dict)):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = value
  return out


def available_arms(config) -> dict[str, dict]:
  """name -> {'section.field': value}: the built-in arms, then config.study.arms (which may redefine one)."""
  arms = dict(BUILTIN_ARMS)
  for name, overrides in config.study.arms.items():
    arms[name] = _flatten(overrides)
  return arms


def _field(config, path: str):
  """(parent ConfigDict, last key) of a dotted path, or a ValueError naming the valid keys."""
  node, parts = config, path.split('.')
  for i, part in enumerate(parts):
    if not isinstance(node, mc.ConfigDict) or part not in node:
      where = 'config' + ''.join('.' + p for p in parts[:i])
      valid = sorted(node.keys()) if isinstance(node, mc.ConfigDict) else []
      raise ValueError(f'{part!r} is not a field of {where}; valid keys there: {valid}')
    if i == len(parts) - 1:
      return node, part
    node = node[part]


def arm_overrides(config, arm: str) -> dict:
  """The override map of one arm, every path checked against the config (an error names the valid ones)."""
  arms = available_arms(config)
  if arm not in arms:
    raise ValueError(f'Unknown arm {arm!r} in config.arms; valid arms: {sorted(arms)} '
                     '(define more under config.study.arms).')
  overrides = arms[arm]
  for path in overrides:
    if path in ('arms', 'seeds', 'seed') or path.startswith('study.'):
      raise ValueError(f'Arm {arm!r} overrides {path!r}, which defines the study itself; an arm may '
                       'change any other field.')
    try:
      _field(config, path)
    except ValueError as e:
      raise ValueError(f'Arm {arm!r} overrides unknown key {path!r}: {e}.') from None
  return overrides


def check_explicit_overrides(config, arms: list[str], explicit: set[str] | frozenset[str]) -> None:
  """An error when an arm would overwrite a field the user set explicitly (e.g. on the command line).

  Without it `--config.rl.algorithm=ppo` on a config whose arms are grpo,cfgrpo would silently
  train GRPO: the arm's value wins.
  """
  for arm in arms:
    clashes = sorted(set(arm_overrides(config, arm)) & set(explicit))
    if clashes:
      raise ValueError(
          f'--config.{clashes[0]} is set explicitly, but arm {arm!r} of this study (config.arms='
          f'{config.arms!r}) sets {clashes[0]}={arm_overrides(config, arm)[clashes[0]]!r} and would '
          f'overwrite it. Choose arms that mean what you want (e.g. --config.arms=ppo,cfppo for PPO; '
          f'built-in arms: {sorted(BUILTIN_ARMS)}), or run one job without arms: --config.arms= .')


def arm_config(config, arm: str, seed: int) -> mc.ConfigDict:
  """A deep copy of the study config with the arm's overrides and the seed applied, arms cleared
  (and the base's seed moved by the RL seed when config.study.vary_base)."""
  overrides = arm_overrides(config, arm)
  c = copy.deepcopy(config)
  with c.unlocked():
    for path, value in overrides.items():
      parent, key = _field(c, path)
      parent[key] = value
    c.seed = seed
    c.arms = ''
    if c.study.vary_base:   # the base's seed moves with the RL seed: seed spread then includes the base
      c.pretrain.seed = config.pretrain.seed + seed
  return c
