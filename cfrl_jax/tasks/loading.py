"""Records of real data sets from the Hugging Face hub, local files or TensorFlow Datasets.

    records = load_split(config, 'train')       # Records(rows=[{...}, ...], where=['...row 0', ...])
    train, eval = load_train_eval(config)        # with the held-out / size options applied
    require_fields(records, ('question', 'answer'), hint='...')

Sources (config.source):

    'hub'    datasets.load_dataset(hub_id, hub_config or None, split=...), where the network
             allows (a local directory of data files works too, offline)
    'files'  comma-separated paths or globs of .jsonl / .json / .parquet files
             (config.train_files / config.eval_files)
    'tfds'   tfds.data_source(tfds_name, split=..., data_dir=tfds_data_dir): needs a data set
             prepared in array_record format; works without TensorFlow

Every record keeps where it came from (file and row index), so an error about a row
names the file and the index. A data file, hub split or TFDS split with no rows is an
error when it is loaded (naming the file or split and whether it feeds train or eval),
not at the first training or eval step; so is config.task.max_train=0.
"""
from __future__ import annotations

import glob
import json
import os
import random
from typing import Any, NamedTuple, Sequence

SOURCES = ('hub', 'files', 'tfds')
SPLITS = ('train', 'eval')


class Records(NamedTuple):
  rows: list[dict[str, Any]]
  where: list[str]          # for each row: '<file> row <i>' or similar

  def take(self, indices: Sequence[int]) -> 'Records':
    return Records([self.rows[i] for i in indices], [self.where[i] for i in indices])


# --- files ------------------------------------------------------------------------------
def expand_paths(spec: str, field: str = 'files') -> list[str]:
  """Comma-separated paths or glob patterns -> sorted existing files; a missing one is an error."""
  if not spec or not spec.strip():
    raise ValueError(f'config.task.{field} is empty; give paths of .jsonl / .json / .parquet files.')
  paths = []
  for part in (p.strip() for p in spec.split(',')):
    if not part:
      continue
    if glob.has_magic(part):
      found = sorted(glob.glob(os.path.expanduser(part)))
      if not found:
        raise FileNotFoundError(f'config.task.{field}: no file matches {part!r}.')
      paths.extend(found)
    else:
      path = os.path.expanduser(part)
      if not os.path.isfile(path):
        raise FileNotFoundError(f'config.task.{field}: data file {part!r} does not exist'
                                + (' (it is a directory)' if os.path.isdir(path) else '') + '.')
      paths.append(path)
  return paths


def read_jsonl(path: str) -> Records:
  """One JSON object per line (blank lines skipped); a .json file may also hold one JSON list."""
  with open(path, encoding='utf-8') as f:
    text = f.read()
  if path.endswith('.json') and text.lstrip().startswith('['):
    try:
      rows = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: not valid JSON ({e}).') from e
    where = [f'{path} row {i}' for i in range(len(rows))]
  else:
    rows, where = [], []
    for line_no, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f'{path} line {line_no} (row {len(rows)}): not valid JSON ({e}).') from e
      where.append(f'{path} row {len(rows) - 1} (line {line_no})')
  for row, w in zip(rows, where):
    if not isinstance(row, dict):
      raise ValueError(f'{w}: expected a JSON object with named fields, got {type(row).__name__}.')
  return Records(rows, where)


def read_parquet(path: str) -> Records:
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  try:
    rows = pq.read_table(path).to_pylist()
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{path}: cannot read it as parquet ({type(e).__name__}: {e}).') from e
  return Records(rows, [f'{path} row {i}' for i in range(len(rows))])


def _split_of(field: str) -> str:
  """'train_files' -> ' (the train split)'; other fields name no split."""
  which = field[:-len('_files')] if field.endswith('_files') else ''
  return f' (the {which} split)' if which in SPLITS else ''


def read_files(spec: str, field: str = 'files') -> Records:
  """All rows of the files in `spec`, in file order; a file with no rows is an error."""
  rows, where = [], []
  for path in expand_paths(spec, field):
    if path.endswith('.parquet'):
      part = read_parquet(path)
    elif path.endswith(('.jsonl', '.json')):
      part = read_jsonl(path)
    else:
      raise ValueError(f'config.task.{field}: {path!r} has an unknown extension; use .jsonl, .json or .parquet.')
    if not part.rows:
      # An empty shard is a failed export or a wrong path far more often than an intent.
      raise ValueError(f'config.task.{field}{_split_of(field)}: data file {path!r} has no rows '
                       f'({os.path.getsize(path)} bytes); fill it or remove it from config.task.{field}.')
    rows += part.rows
    where += part.where
  return Records(rows, where)


# --- hub --------------------------------------------------------------------------------
def load_hub(hub_id: str, hub_config: str, split: str) -> Records:
  """A split through datasets.load_dataset (hub id, or a local directory of data files)."""
  import datasets  # pylint: disable=import-outside-toplevel
  try:
    ds = datasets.load_dataset(hub_id, hub_config or None, split=split)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f'could not load split {split!r} of {hub_id!r}' + (f' (config {hub_config!r})' if hub_config else '')
        + f' with datasets.load_dataset: {type(e).__name__}: {e}\nWithout network access use '
        "config.task.source='files' with train_files/eval_files, or source='tfds'.") from e
  label = f'{hub_id}' + (f'[{hub_config}]' if hub_config else '') + f' split {split!r}'
  rows = [dict(r) for r in ds]
  return Records(rows, [f'{label} row {i}' for i in range(len(rows))])


# --- tfds -------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
  """numpy / bytes values of a TFDS record -> Python str / int / float / list."""
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if hasattr(value, 'tolist'):
    value = value.tolist()
    if isinstance(value, list):
      return [_plain(v) for v in value]
    return value.decode('utf-8') if isinstance(value, bytes) else value
  return value


def load_tfds(name: str, split: str, data_dir: str = '') -> Records:
  """A split through tfds.data_source (array_record data sets; TensorFlow is not needed)."""
  if not name:
    raise ValueError("config.task.tfds_name is empty; name the TFDS data set (e.g. 'gsm8k').")
  if data_dir and not os.path.isdir(os.path.expanduser(data_dir)):
    raise FileNotFoundError(f'config.task.tfds_data_dir {data_dir!r} does not exist.')
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  try:
    source = tfds.data_source(name, split=split, data_dir=os.path.expanduser(data_dir) or None)
  except Exception as e:  # pylint: disable=broad-except
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else ''
    where = f'data_dir {data_dir!r}' if data_dir else 'the default TFDS data_dir'
    present = sorted(os.listdir(os.path.expanduser(data_dir))) if data_dir else []
    raise ValueError(
        f'tfds.data_source({name!r}, split={split!r}) failed in {where}'
        + (f' (it holds {present})' if data_dir else '') + f': {type(e).__name__}: {first_line}\n'
        'Prepare the data set there in array_record format first, e.g. '
        "builder.download_and_prepare(file_format='array_record') or "
        f'`tfds build {name} --data_dir=... --file_format=array_record`.') from e
  n = len(source)
  rows = [_plain(r) for r in (source.__getitems__(list(range(n))) if n else [])]
  label = f'tfds {name} split {split!r}' + (f' in {data_dir}' if data_dir else '')
  return Records(rows, [f'{label} row {i}' for i in range(n)])


# --- splits -----------------------------------------------------------------------------
def load_split(config, which: str) -> Records:
  """The raw records of the train or eval split named by the task config."""
  if which not in SPLITS:
    raise ValueError(f'which={which!r}; expected one of {SPLITS}.')
  source = config.source
  split = config.train_split if which == 'train' else config.eval_split
  if source == 'files':
    field = f'{which}_files'
    return read_files(config[field], field)
  if source == 'hub':
    hub_id, hub_config = config.hub_id, config.hub_config
    if which == 'eval' and config.eval_hub_id:
      hub_id, hub_config = config.eval_hub_id, config.eval_hub_config
    records = load_hub(hub_id, hub_config, split)
    what = f'{hub_id!r}' + (f' (config {hub_config!r})' if hub_config else '')
  elif source == 'tfds':
    records = load_tfds(config.tfds_name, split, config.tfds_data_dir)
    what = f'tfds {config.tfds_name!r}' + (f' in {config.tfds_data_dir}' if config.tfds_data_dir else '')
  else:
    raise ValueError(f'config.task.source={source!r}; expected one of {SOURCES}.')
  if not records.rows:
    raise ValueError(f'the {which} split {split!r} of {what} has no rows; set config.task.{which}_split to a '
                     'split that holds rows' + (' (or use config.task.eval_holdout).' if which == 'eval' else '.'))
  return records


def load_train_eval(config) -> tuple[Records, Records]:
  """(train, eval) records: eval from its own split, or `eval_holdout` rows held out of train.

  The held-out rows are chosen by a shuffle seeded with config.seed; max_train / max_eval
  (-1: all) then keep the first rows of each.
  """
  train = load_split(config, 'train')
  if config.eval_holdout > 0:
    if config.eval_holdout >= len(train.rows):
      raise ValueError(f'config.task.eval_holdout={config.eval_holdout} leaves no training rows '
                       f'(the train split has {len(train.rows)}).')
    order = list(range(len(train.rows)))
    random.Random(f'cfrl_jax.holdout|{config.seed}').shuffle(order)
    held = sorted(order[:config.eval_holdout])
    kept = sorted(order[config.eval_holdout:])
    train, evaluation = train.take(kept), train.take(held)
  else:
    evaluation = load_split(config, 'eval')
  if config.max_train == 0:
    raise ValueError('config.task.max_train=0 leaves no training rows; use -1 for all rows or a positive count.')
  if config.max_train >= 0:
    train = train.take(range(min(config.max_train, len(train.rows))))
  if config.max_eval >= 0:
    evaluation = evaluation.take(range(min(config.max_eval, len(evaluation.rows))))
  return train, evaluation


def require_fields(records: Records, fields: Sequence[str], hint: str = '') -> None:
  """Raises ValueError naming the first row (file and index) that lacks one of `fields`."""
  for row, where in zip(records.rows, records.where):
    for f in fields:
      if row.get(f) is None:
        raise ValueError(f'{where} has no field {f!r} (its fields: {sorted(row)}).'
                         + (f' {hint}' if hint else ''))


def data_config_fields(hub_id: str, hub_config: str, question_field: str, answer_field: str,
                       tfds_name: str, eval_split: str = 'test', eval_hub_id: str = '',
                       eval_hub_config: str = '') -> dict:
  """The config fields of a real data set's source (shared by gsm8k and math)."""
  return {
      'source': 'hub',            # 'hub' | 'files' | 'tfds'
      'hub_id': hub_id,
      'hub_config': hub_config,
      'eval_hub_id': eval_hub_id,  # '' -> hub_id
      'eval_hub_config': eval_hub_config,
      'train_split': 'train',
      'eval_split': eval_split,
      'train_files': '',           # source='files': comma-separated paths / globs
      'eval_files': '',
      'tfds_name': tfds_name,
      'tfds_data_dir': '',         # '' -> TFDS's default data_dir
      'eval_holdout': 0,           # > 0: hold out this many train rows as eval instead
      'max_train': -1,             # -1: all rows
      'max_eval': -1,
      'question_field': question_field,
      'answer_field': answer_field,
  }
