"""The README's eNTK notebook snippet (docs/ntk_snippet.py, included verbatim) runs as written
against a tiny local checkpoint."""
import os
import pathlib

import pytest

SNIPPET = pathlib.Path(__file__).resolve().parent.parent / 'docs' / 'ntk_snippet.py'


@pytest.mark.slow
def test_ntk_snippet_runs_on_a_tiny_checkpoint(tiny_qwen2_dir, monkeypatch, capsys):
  monkeypatch.setenv('CHECKPOINT', os.fspath(tiny_qwen2_dir))
  namespace = {'__name__': '__snippet__'}
  exec(compile(SNIPPET.read_text(), str(SNIPPET), 'exec'), namespace)
  k = namespace['k']
  n = len(namespace['texts'])
  assert k.total.shape == (n, n)
  out = capsys.readouterr().out
  assert 'R share of the diagonal:' in out and 'head norm' in out
  share = float(out.split('R share of the diagonal:')[1].split()[0])
  assert 0.0 < share < 1.0
