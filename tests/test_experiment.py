"""experiment: a run's recorded cost survives resumes (run_time.json), with a fallback from its files."""
import json
import os

import pytest

from cfrl_jax import experiment


def test_run_time_sums_every_invocation(tmp_path):
  run = str(tmp_path)
  experiment._add_run_time(run, 100.0)
  experiment._add_run_time(run, 20.5)   # a resume
  assert experiment.run_seconds(run) == 120.5
  assert json.load(open(os.path.join(run, experiment.RUN_TIME_FILE)))['invocations'] == 2


def test_without_a_record_the_time_is_read_from_the_tensorboard_events(tmp_path):
  # Two invocations (a killed run and its resume), each its own event file with real wall times;
  # the gap between them is not counted.
  import time
  from tensorboardX import SummaryWriter
  for i in range(2):
    start = time.time()   # the file's creation event carries the real clock; the scalars follow it
    w = SummaryWriter(str(tmp_path / 'tb'), filename_suffix=f'.{i}')
    for k, t in enumerate((start + 1.0, start + 30.0, start + 100.0)):
      w.add_scalar('train/x', k, k, walltime=t)
    w.close()
  spans = sorted(experiment._event_span(str(p)) for p in (tmp_path / 'tb').iterdir())
  assert len(spans) == 2
  total = experiment.run_seconds(str(tmp_path))
  assert abs(total - 200.0) < 1.0   # the creation events come a few ms after `start`
  experiment._add_run_time(str(tmp_path), 10.0, earlier=total)   # a resume starts the record from it
  assert experiment.run_seconds(str(tmp_path)) == total + 10.0
  assert experiment.run_seconds(str(tmp_path / 'missing')) is None


def _record(config, arms, seeds, timings, base_seconds_this_run=0.0):
  return {'arms': arms, 'seeds': seeds, 'config': json.loads(config.to_json_best_effort()),
          'bases': [{'cache_key': 'k', 'seconds': 600.0, 'seconds_this_run': base_seconds_this_run, 'seeds': seeds}],
          'timings': dict(timings, this_invocation=sum(timings.values()))}


def _config(**overrides):
  import ml_collections
  from configs import demo
  c = ml_collections.ConfigDict(demo.get_config('smoke').to_dict())
  for path, value in overrides.items():
    *parents, leaf = path.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def test_invocations_of_one_study_merge_into_one_record(tmp_path):
  # One process per seed, the first also pretraining the base: arms and seeds add up, each run's time
  # is kept, and the total counts the pretraining once.
  a = _record(_config(seeds='0'), ['grpo', 'cfgrpo'], [0], {'grpo/seed0': 100.0, 'cfgrpo/seed0': 90.0}, 600.0)
  b = _record(_config(seeds='2'), ['grpo', 'cfgrpo', 'grpo_headlr'], [2],
              {'grpo/seed2': 110.0, 'cfgrpo/seed2': 95.0, 'grpo_headlr/seed2': 105.0})
  m = experiment.merge_study_records(a, b)
  assert m['arms'] == ['grpo', 'cfgrpo', 'grpo_headlr'] and m['seeds'] == [0, 2]
  assert experiment.merge_study_records(b, a)['seeds'] == [0, 2]
  assert m['timings']['total'] == 100 + 90 + 110 + 95 + 105 + 600
  assert len(m['bases']) == 1 and m['bases'][0]['seeds'] == [0, 2]


def test_joining_a_study_with_other_settings_is_refused_before_any_work(tmp_path):
  run_dir = str(tmp_path)
  earlier = _record(_config(seeds='0', run_dir='elsewhere'), ['grpo'], [0], {'grpo/seed0': 1.0})
  record = earlier['config']
  record.pop('eval')   # written before a section existed: its defaults stand in
  json.dump(earlier, open(tmp_path / experiment.STUDY_FILE, 'w'))
  same = _config(seeds='1', resume=True, run_dir=run_dir)
  same.eval.update(experiment.base_config('arithmetic').eval.to_dict())
  assert experiment.earlier_study_record(same, run_dir)['arms'] == ['grpo']
  with pytest.raises(ValueError, match=r'other settings: rl\.lr \(0\.001 there, 0\.002 now\).*another --config\.run_dir'):
    experiment.earlier_study_record(_config(**{'rl.lr': 2e-3, 'eval': same.eval}), run_dir)
  assert experiment.earlier_study_record(_config(), str(tmp_path / 'fresh')) is None


def test_concurrent_invocations_keep_every_seed_in_the_study_record(tmp_path):
  # Three processes of one study (one per seed) all start before any has written study.json; each
  # writes when its runs end. The record must hold all three seeds and every run's time, whatever
  # order they finish in (a record merged only with the start-time copy kept the last writer's seed).
  run_dir = str(tmp_path)
  for seed in (1, 0, 2):
    c = _config(seeds=str(seed), run_dir=run_dir, resume=True)
    experiment.write_study_record(c, run_dir, _record(c, ['grpo', 'cfgrpo'], [seed],
                                                      {f'grpo/seed{seed}': 10.0 + seed, f'cfgrpo/seed{seed}': 20.0}))
  record = json.load(open(tmp_path / experiment.STUDY_FILE))
  assert record['seeds'] == [0, 1, 2] and record['arms'] == ['grpo', 'cfgrpo']
  assert sorted(k for k in record['timings'] if '/' in k) == sorted(
      f'{a}/seed{s}' for a in ('grpo', 'cfgrpo') for s in (0, 1, 2))
  assert record['timings']['total'] == 10 + 11 + 12 + 3 * 20
  assert record['base']['seeds'] == [0, 1, 2]
  assert not [p for p in os.listdir(run_dir) if '.tmp' in p]   # replaced atomically, nothing left over
  # one with other settings that appeared meanwhile is refused at write time too
  with pytest.raises(ValueError, match='other settings'):
    other = _config(**{'rl.lr': 2e-3, 'seeds': '3', 'run_dir': run_dir})
    experiment.write_study_record(other, run_dir, _record(other, ['grpo'], [3], {'grpo/seed3': 1.0}))
  assert json.load(open(tmp_path / experiment.STUDY_FILE))['seeds'] == [0, 1, 2]
