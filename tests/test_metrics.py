"""The metrics stream: cut-off last lines, truncation on resume, one record per (step, kind) in reports."""
import json
import os

import pytest

from cfrl_jax import metrics as metrics_lib


def write_lines(path, lines, end=''):
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + end)


def rec(step, kind='train', **values):
  return {'step': step, 'kind': kind, **values}


def test_cut_off_last_line_is_dropped_with_a_warning(tmp_path):
  path = str(tmp_path / 'metrics.jsonl')
  write_lines(path, [json.dumps(rec(1, x=1.0)), json.dumps(rec(2, x=2.0)), '{"step": 3, "kind": "tr'])
  with pytest.warns(UserWarning, match=r'metrics.jsonl:3: dropped a cut-off last line'):
    out = metrics_lib.read_metrics(path)
  assert out == [rec(1, x=1.0), rec(2, x=2.0)]


def test_malformed_middle_line_is_an_error_naming_file_and_line(tmp_path):
  path = str(tmp_path / 'metrics.jsonl')
  write_lines(path, [json.dumps(rec(1)), '{"step": 2, "ki', json.dumps(rec(3))], end='\n')
  with pytest.raises(ValueError, match=r'metrics.jsonl:2: malformed metrics line'):
    metrics_lib.read_metrics(path)


def test_complete_malformed_last_line_is_an_error(tmp_path):
  # Ends with its newline: written whole, so not a cut but corruption.
  path = str(tmp_path / 'metrics.jsonl')
  write_lines(path, [json.dumps(rec(1)), 'not json'], end='\n')
  with pytest.raises(ValueError, match=r'metrics.jsonl:2: malformed'):
    metrics_lib.read_metrics(path)


def test_last_line_without_newline_that_parses_is_kept(tmp_path):
  path = str(tmp_path / 'metrics.jsonl')
  write_lines(path, [json.dumps(rec(1)), json.dumps(rec(2))])
  assert [r['step'] for r in metrics_lib.read_metrics(path)] == [1, 2]


def test_truncate_after_keeps_the_restored_step_and_drops_a_cut_line(tmp_path, capsys):
  w = metrics_lib.MetricsWriter(str(tmp_path), tensorboard=False, enabled=True)
  lines = [rec(0, 'eval', a=0.5), rec(1, x=1.0), rec(2, 'probe', p=2.0), rec(2, x=2.0), rec(2, 'eval', a=0.6),
           rec(3, x=3.0)]
  write_lines(w.path, [json.dumps(r) for r in lines] + ['{"step": 4, "ki'])
  w.truncate_after(2)
  assert 'dropped the cut-off last line 7' in capsys.readouterr().out
  assert metrics_lib.read_metrics(w.path) == lines[:5]
  w.write(3, 'train', {'x': 3.5})
  assert [(r['step'], r['kind']) for r in metrics_lib.read_metrics(w.path)] == [
      (0, 'eval'), (1, 'train'), (2, 'probe'), (2, 'train'), (2, 'eval'), (3, 'train')]
  assert not os.path.exists(w.path + '.tmp')


def test_start_fresh_empties_the_stream_with_a_note(tmp_path, capsys):
  w = metrics_lib.MetricsWriter(str(tmp_path), tensorboard=False, enabled=True)
  write_lines(w.path, [json.dumps(rec(0, 'eval')), json.dumps(rec(1))], end='\n')
  w.start_fresh()
  assert 'starts afresh' in capsys.readouterr().out
  assert metrics_lib.read_metrics(w.path) == []
  w.write(1, 'train', {'x': 1})
  assert metrics_lib.read_metrics(w.path) == [rec(1, x=1.0)]


def test_writer_on_another_process_leaves_the_file_alone(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  write_lines(str(path), [json.dumps(rec(5))], end='\n')
  w = metrics_lib.MetricsWriter(str(tmp_path), tensorboard=False, enabled=False)
  w.truncate_after(1)
  w.start_fresh()
  assert metrics_lib.read_metrics(str(path)) == [rec(5)]


def test_dedupe_keeps_the_last_record_per_step_and_kind():
  stream = [rec(0, 'eval', a=0.1), rec(1, x=1.0), rec(0, 'eval', a=0.2), rec(1, x=9.0), rec(2, x=2.0),
            rec(1, 'probe', p=1.0), 'junk', {'step': 'x', 'kind': 'train'}]
  assert metrics_lib.dedupe(stream) == [rec(0, 'eval', a=0.2), rec(1, x=9.0), rec(2, x=2.0),
                                        rec(1, 'probe', p=1.0), 'junk', {'step': 'x', 'kind': 'train'}]


def test_report_never_averages_a_step_logged_twice(tmp_path):
  from cfrl_jax.analysis import report_runs
  path = str(tmp_path / 'metrics.jsonl')
  # A second history appended by an old resume: steps 0-1 twice with different values.
  first = [rec(0, 'eval', **{'pass@1': 0.2}), rec(1, reward_mean=0.0)]
  second = [rec(0, 'eval', **{'pass@1': 0.4}), rec(1, reward_mean=1.0)]
  write_lines(path, [json.dumps(r) for r in first + second], end='\n')
  run = report_runs.load_run(path, 'grpo', 0)
  assert run.records['eval'] == [rec(0, 'eval', **{'pass@1': 0.4})]
  assert run.records['train'] == [rec(1, reward_mean=1.0)]
