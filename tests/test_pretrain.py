"""Pretraining from scratch stops at a validation-accuracy band (config.pretrain.stop_accuracy), not a step."""
import json

import ml_collections
import pytest

from cfrl_jax import tokenization
from cfrl_jax.config import validate
from cfrl_jax.models import hf
from cfrl_jax.policy import make_policy
from cfrl_jax.tasks import build_task
from cfrl_jax.train import pretrain
from configs import demo


def _smoke(**pretrain_fields):
  c = ml_collections.ConfigDict(demo.get_config('smoke').to_dict())
  c.pretrain.steps = 20
  c.pretrain.eval_from = 5
  c.pretrain.eval_every = 5
  c.pretrain.validation_problems = 16
  c.pretrain.update(pretrain_fields)
  return c


def test_stops_at_the_first_reading_at_or_above_the_band(tmp_path, monkeypatch):
  readings = iter([0.10, 0.45, 0.50, 0.90])
  seen = []

  def scripted(policy, params, rows, task, max_new_tokens):
    seen.append(len(rows))
    return next(readings)

  monkeypatch.setattr(pretrain, 'validation_accuracy', scripted)
  c = _smoke(stop_accuracy=0.5)
  summary = pretrain.pretrain(c, build_task(c.task), str(tmp_path), progress=False)
  assert summary['stopped_at'] == 15 and summary['steps'] == 15
  assert [r['step'] for r in summary['validation']] == [5, 10, 15]
  assert seen == [16, 16, 16]


def test_the_saved_base_is_the_one_that_was_read(tmp_path):
  # A reading of 0 is enough to stop; the accuracy of the saved checkpoint, loaded back as a user would,
  # must equal the reading that stopped it (the stop does not save a later or an earlier step).
  c = _smoke(stop_accuracy=1e-6, eval_from=10, eval_every=10)
  task = build_task(c.task)
  summary = pretrain.pretrain(c, task, str(tmp_path), progress=False)
  tok = tokenization.load_tokenizer(str(tmp_path))
  cfg, params = hf.load_pretrained(str(tmp_path), tie='untie')
  policy = make_policy(cfg, tok, None)
  again = pretrain.validation_accuracy(policy, params, task.validation_rows(16), task, c.rl.max_new_tokens)
  if summary['stopped_at'] is None:   # every reading was 0: it ran to the cap, and so must the check
    assert summary['steps'] == 20 and all(r['validation_greedy_accuracy'] == 0 for r in summary['validation'])
  else:
    assert again == summary['validation'][-1]['validation_greedy_accuracy'] > 0


def test_an_unreached_band_runs_to_the_cap_and_says_so(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(pretrain, 'validation_accuracy', lambda *a: 0.2)
  c = _smoke(stop_accuracy=0.9)
  summary = pretrain.pretrain(c, build_task(c.task), str(tmp_path), progress=False)
  assert summary['stopped_at'] is None and summary['steps'] == 20
  assert [r['step'] for r in summary['validation']] == [5, 10, 15, 20]
  out = capsys.readouterr().out
  assert 'config.pretrain.steps=20' in out and 'lower config.pretrain.stop_accuracy' in out
  json.dumps(summary)   # pretrain.json is written from it


def test_validation_problems_come_from_train_patterns_and_miss_the_eval_set():
  c = _smoke()
  task = build_task(c.task)
  rows = task.validation_rows(64)
  held_out = {r['expression'] for r in task.eval}
  assert len(rows) == 64 and not held_out & {r['expression'] for r in rows}


def test_out_of_range_band_and_a_task_without_validation_are_clear_errors():
  c = _smoke(stop_accuracy=1.5)
  with pytest.raises(ValueError, match=r'config\.pretrain\.stop_accuracy=1\.5.*\[0, 1\]'):
    validate(c)
  task = build_task(c.task)
  task.validation_fn = None
  with pytest.raises(ValueError, match='stop_accuracy=0'):
    task.validation_rows(4)
