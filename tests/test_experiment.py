"""experiment: a run's recorded cost survives resumes (run_time.json), with a fallback from its files."""
import json
import os

from cfrl_jax import experiment


def test_run_time_sums_every_invocation(tmp_path):
  run = str(tmp_path)
  experiment._add_run_time(run, 100.0)
  experiment._add_run_time(run, 20.5)   # a resume
  assert experiment.run_seconds(run) == 120.5
  assert json.load(open(os.path.join(run, experiment.RUN_TIME_FILE)))['invocations'] == 2


def test_without_a_record_one_invocation_is_read_from_its_files(tmp_path):
  run = tmp_path
  (run / 'tb').mkdir()
  (run / 'tb' / 'events.out.tfevents.1000000000.host').write_text('')
  (run / 'metrics.jsonl').write_text('{}\n')
  os.utime(run / 'metrics.jsonl', (1000000750.0, 1000000750.0))
  assert experiment.run_seconds(str(run)) == 750.0
  # Two event files: two invocations whose gap is unknown, so no figure rather than a wrong one.
  (run / 'tb' / 'events.out.tfevents.1000000500.host').write_text('')
  assert experiment.run_seconds(str(run)) is None
  assert experiment.run_seconds(str(tmp_path / 'missing')) is None
