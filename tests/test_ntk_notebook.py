"""docs/ntk_probes.ipynb runs top to bottom in a fresh kernel (nbclient), on a tiny local checkpoint and on
the tiny checkpoint it makes itself, and the numbers it prints equal an independent computation: per-entry
gradients of the same log-probs by torch autograd through the transformers model, split into lm_head (R)
and every other parameter (G)."""
import os
import pathlib
import re

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / 'docs' / 'ntk_probes.ipynb'


def run_notebook(tmp_path, monkeypatch, checkpoint):
  """Executes the notebook, `checkpoint` set after its parameters cell (None: the notebook's default).
  Returns (its parameters, the text it printed, whether it displayed a PNG)."""
  import nbformat
  from nbclient import NotebookClient
  nb = nbformat.read(NOTEBOOK, as_version=4)
  at = next(i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', []))
  parameters = {}
  exec(nb.cells[at].source, parameters)   # pylint: disable=exec-used  (plain assignments)
  if checkpoint is not None:
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(f'CHECKPOINT = {os.fspath(checkpoint)!r}'))
  # The kernel imports cfrl_jax from this checkout and shares the session's compilation cache (conftest).
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')])))
  NotebookClient(nb, timeout=900, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
  printed = ''.join(o.text for o in outputs if o.output_type == 'stream' and o.name == 'stdout')
  shown_png = any('image/png' in o.get('data', {}) for o in outputs)
  return parameters, printed, shown_png


def printed_numbers(printed: str, label: str) -> list[float]:
  line = next(l for l in printed.splitlines() if l.startswith(label))
  return [float(x) for x in re.findall(r'[-+]?\d+\.\d+(?:e[-+]\d+)?', line[len(label):])]


def torch_kernel_parts(load_hf_model, checkpoint, texts, positions):
  """(R, G) of the notebook's entries (the last `positions` next-token log-probs of each text, in text
  order), float64, from torch per-entry gradients: R over lm_head.weight, G over every other parameter."""
  import torch
  import transformers
  model = load_hf_model(checkpoint)
  tok = transformers.AutoTokenizer.from_pretrained(checkpoint)
  assert model.config.tie_word_embeddings is False   # untied: lm_head is the head, no cross term
  names = [n for n, _ in model.named_parameters()]
  params = [p for _, p in model.named_parameters()]
  head = [n == 'lm_head.weight' for n in names]
  rows_head, rows_backbone = [], []
  for text in texts:
    ids = torch.tensor([tok(text)['input_ids']])   # one text alone: no padding
    logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    L = ids.shape[1]
    for t in range(L - positions, L):    # target token t, predicted from tokens[:t]
      grads = torch.autograd.grad(logp[t - 1, ids[0, t]], params, retain_graph=True)
      flat = lambda gs: torch.cat([g.reshape(-1).double() for g in gs]).numpy()
      rows_head.append(flat([g for g, h in zip(grads, head) if h]))
      rows_backbone.append(flat([g for g, h in zip(grads, head) if not h]))
  jh, jb = np.stack(rows_head), np.stack(rows_backbone)
  return jh @ jh.T, jb @ jb.T


@pytest.mark.slow       # a kernel, cfrl_jax's imports and one jit compile of the kernel per run
@pytest.mark.parametrize('given', [True, False], ids=['given_checkpoint', 'own_tiny_checkpoint'])
def test_notebook_prints_the_kernel_parts_torch_gives(tiny_qwen2_dir, load_hf_model, tmp_path, monkeypatch, given):
  parameters, printed, shown_png = run_notebook(tmp_path, monkeypatch, tiny_qwen2_dir if given else None)
  assert shown_png, 'the notebook did not display its R vs G figure'
  loaded = re.search(r'^(.+): qwen2, ', printed, re.M)   # the notebook's line naming what it loaded
  assert loaded, printed
  checkpoint = loaded.group(1)
  assert checkpoint == os.fspath(tiny_qwen2_dir) if given else os.path.isdir(checkpoint)
  texts, positions = parameters['TEXTS'], parameters['POSITIONS']
  r, g = torch_kernel_parts(load_hf_model, checkpoint, texts, positions)
  n = len(texts) * positions
  seq = np.repeat(np.arange(len(texts)), positions)
  other = seq[:, None] != seq[None, :]
  diag = np.eye(n, dtype=bool)
  assert f'entries: {n}\n' in printed
  # float32 in the notebook against float64 sums of torch's float32 gradients here.
  # The shares are printed with 6 decimals: atol covers the rounding of small ones.
  np.testing.assert_allclose(printed_numbers(printed, 'R share of the diagonal:'), [np.trace(r) / np.trace(r + g)],
                             rtol=1e-4, atol=1e-6)
  r_abs, g_abs = np.abs(r[other]).mean(), np.abs(g[other]).mean()
  np.testing.assert_allclose(printed_numbers(printed, 'R share off the diagonal'), [r_abs / (r_abs + g_abs)],
                             rtol=1e-4, atol=1e-6)
  scale = np.abs(np.diag(r + g)).mean()
  np.testing.assert_allclose(printed_numbers(printed, 'mean R, G, cross on the diagonal:'),
                             [r[diag].mean(), g[diag].mean(), 0.0], rtol=1e-4, atol=1e-6 * scale)
  np.testing.assert_allclose(printed_numbers(printed, 'mean R, G, cross off the diagonal'),
                             [r[other].mean(), g[other].mean(), 0.0], rtol=1e-4, atol=1e-6 * scale)
  head = load_hf_model(checkpoint).lm_head.weight.detach().double().numpy()
  np.testing.assert_allclose(printed_numbers(printed, 'head norm ||W||_F:'), [np.linalg.norm(head)], rtol=1e-5)
