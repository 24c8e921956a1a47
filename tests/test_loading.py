"""Real data sets from local JSONL / parquet files, TFDS array_record and `datasets` (tasks/loading.py,
tasks/gsm8k.py, tasks/math.py). Every fixture is built here, in tmp dirs, in the real schemas."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cfrl_jax.tasks import build_task, loading, task_config
from cfrl_jax.tasks.rewards import correctness_reward

# GSM8K schema: question, answer ('... <<a*b=c>> ... #### N').
GSM8K_TRAIN = [
    {'question': 'Tom has 3 boxes with 4 pens each. How many pens does he have?',
     'answer': 'Tom has 3*4 = <<3*4=12>>12 pens.\n#### 12'},
    {'question': 'A shirt costs $1,200 and is 25% off. What does it cost?',
     'answer': 'The discount is 1200*25/100 = <<1200*25/100=300>>300 dollars.\n1200-300 = <<1200-300=900>>900\n#### 900'},
    {'question': 'Mia reads 10 pages a day for 120 days. How many pages?',
     'answer': '10*120 = <<10*120=1200>>1,200\n#### 1,200'},
]
GSM8K_TEST = [
    {'question': 'Sam buys 2 apples at $3 each. How much does he spend?', 'answer': '2*3 = <<2*3=6>>6\n#### 6'},
]
# MATH schema: problem, solution (\boxed{}), level ('Level N'), type. MATH-500 adds answer, subject, unique_id.
MATH_TRAIN = [
    {'problem': 'Solve $3x = 14$.', 'solution': 'Divide: $x = \\boxed{\\frac{14}{3}}$.',
     'level': 'Level 2', 'type': 'Algebra'},
    {'problem': 'What is $\\sqrt{16}$?', 'solution': 'It is $\\boxed{4}$.', 'level': 'Level 1', 'type': 'Prealgebra'},
    {'problem': 'Find $f(2)$ for $f(x)=x^2+{1}$.', 'solution': '$f(2) = 4 + 1 = \\boxed{5}$',
     'level': 'Level 5', 'type': 'Algebra'},
]
MATH500_TEST = [
    {'problem': 'Convert $(0,3)$ to polar.', 'solution': '... $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$',
     'answer': '\\left( 3, \\frac{\\pi}{2} \\right)', 'subject': 'Precalculus', 'level': 2,
     'unique_id': 'test/precalculus/807.json'},
]


def write_jsonl(path, rows):
  with open(path, 'w', encoding='utf-8') as f:
    for r in rows:
      f.write(json.dumps(r) + '\n')
  return str(path)


def write_parquet(path, rows):
  pq.write_table(pa.Table.from_pylist(rows), str(path))
  return str(path)


def gsm8k_files_config(train, evaluation, **kw):
  config = task_config('gsm8k')
  config.source, config.train_files, config.eval_files = 'files', train, evaluation
  for k, v in kw.items():
    config[k] = v
  return config


def test_gsm8k_from_jsonl_and_parquet(tmp_path):
  train = write_jsonl(tmp_path / 'train.jsonl', GSM8K_TRAIN)
  evaluation = write_parquet(tmp_path / 'test.parquet', GSM8K_TEST)
  task = build_task(gsm8k_files_config(train, evaluation))
  assert [r['answer'] for r in task.train] == ['12', '900', '1200']
  assert [r['answer'] for r in task.eval] == ['6']
  assert task.train[0]['prompt'] == f"Question: {GSM8K_TRAIN[0]['question']}\nAnswer:"
  assert task.train[2]['solution'] == GSM8K_TRAIN[2]['answer']
  with pytest.raises(ValueError, match="task 'gsm8k' has no synthetic pretraining corpus"):
    task.pretraining_corpus(10)
  # The reference solutions themselves score 1.
  rows = task.train + task.eval
  assert correctness_reward([r['prompt'] for r in rows], [r['solution'] for r in rows],
                            answer=[r['answer'] for r in rows]) == [1.0] * 4


def test_multiple_files_globs_and_json_arrays(tmp_path):
  write_jsonl(tmp_path / 'part-0.jsonl', GSM8K_TRAIN[:2])
  write_parquet(tmp_path / 'part-1.parquet', GSM8K_TRAIN[2:])
  (tmp_path / 'extra.json').write_text(json.dumps(GSM8K_TEST))
  records = loading.read_files(f"{tmp_path / 'part-*'}, {tmp_path / 'extra.json'}")
  assert [r['question'] for r in records.rows] == [r['question'] for r in GSM8K_TRAIN + GSM8K_TEST]
  assert records.where[3] == f"{tmp_path / 'extra.json'} row 0"


def test_math_from_parquet_and_jsonl_with_filters(tmp_path):
  config = task_config('math')
  config.source = 'files'
  config.train_files = write_parquet(tmp_path / 'math_train.parquet', MATH_TRAIN)
  config.eval_files = write_jsonl(tmp_path / 'math500.jsonl', MATH500_TEST)
  task = build_task(config)
  assert [r['answer'] for r in task.train] == ['\\frac{14}{3}', '4', '5']  # from the last \boxed{}
  assert [r['type'] for r in task.train] == ['Algebra', 'Prealgebra', 'Algebra']
  assert task.eval[0]['answer'] == MATH500_TEST[0]['answer']
  assert task.eval[0]['subject'] == 'Precalculus' and task.eval[0]['unique_id'].startswith('test/')
  assert task.train[0]['prompt'].startswith('Problem: Solve $3x = 14$.\n') and '\\boxed{}' in task.train[0]['prompt']
  fn, _ = task.reward_fns[0]
  assert fn(['p'] * 2, ['so $\\boxed{\\dfrac{14}{3}}$', '\\boxed{4.5}'], answer=[task.train[0]['answer']] * 2) == [1.0, 0.0]
  assert task.is_correct('$\\boxed{(3, \\pi/2)}$', task.eval[0]['answer'])
  config.levels, config.types = (1, 2), ('Algebra',)
  filtered = build_task(config)
  assert [r['answer'] for r in filtered.train] == ['\\frac{14}{3}']
  assert filtered.eval == []  # Precalculus


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  """A tiny 'gsm8k' TFDS data set in array_record format, built by a GeneratorBasedBuilder."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  data_dir = str(tmp_path_factory.mktemp('tfds'))

  class TinyGsm8k(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = 'gsm8k'  # the real TFDS name and schema, so users' code path is the one tested
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      keys = ('question', 'answer', 'annotation', 'short_answer')
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {k: tfds.features.Text() for k in keys}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(GSM8K_TRAIN), 'test': self._generate_examples(GSM8K_TEST)}

    def _generate_examples(self, rows):
      for i, r in enumerate(rows):
        annotation, short = r['answer'].split('#### ')
        yield i, {**r, 'annotation': annotation, 'short_answer': short}

  TinyGsm8k(data_dir=data_dir, file_format='array_record').download_and_prepare()
  return data_dir


def test_gsm8k_from_tfds_array_record(tfds_dir):
  config = task_config('gsm8k')
  config.source, config.tfds_data_dir = 'tfds', tfds_dir
  task = build_task(config)
  assert sorted((r['question'], r['answer']) for r in task.train) == sorted(
      (r['question'], a) for r, a in zip(GSM8K_TRAIN, ['12', '900', '1200']))
  assert [r['answer'] for r in task.eval] == ['6']
  assert all(isinstance(r['solution'], str) for r in task.train)  # bytes decoded
  records = loading.load_tfds('gsm8k', 'train[:2]', tfds_dir)
  assert len(records.rows) == 2 and records.where[1] == f"tfds gsm8k split 'train[:2]' in {tfds_dir} row 1"
  assert set(records.rows[0]) == {'question', 'answer', 'annotation', 'short_answer'}


def test_tfds_errors(tfds_dir, tmp_path):
  with pytest.raises(ValueError, match=r"(?s)tfds.data_source\('math_500'.*array_record"):
    loading.load_tfds('math_500', 'test', tfds_dir)
  with pytest.raises(ValueError, match='validation'):
    loading.load_tfds('gsm8k', 'validation', tfds_dir)
  with pytest.raises(FileNotFoundError, match='tfds_data_dir'):
    loading.load_tfds('gsm8k', 'train', str(tmp_path / 'nowhere'))
  with pytest.raises(ValueError, match='tfds_name is empty'):
    loading.load_tfds('', 'train', tfds_dir)


def test_hub_code_path_with_a_local_directory(tmp_path, monkeypatch):
  import datasets  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(datasets.config, 'HF_DATASETS_CACHE', str(tmp_path / 'cache'))
  data = tmp_path / 'my_gsm8k'
  data.mkdir()
  write_jsonl(data / 'train.jsonl', GSM8K_TRAIN)
  write_jsonl(data / 'test.jsonl', GSM8K_TEST)
  config = task_config('gsm8k')
  config.hub_id, config.hub_config, config.train_split = str(data), '', 'train[:2]'
  task = build_task(config)
  assert [r['answer'] for r in task.train] == ['12', '900'] and [r['answer'] for r in task.eval] == ['6']
  config.eval_split = 'validation'
  with pytest.raises(ValueError, match=r"(?s)could not load split 'validation'.*source='files'"):
    build_task(config)


def test_held_out_eval_and_size_limits(tmp_path):
  rows = [{'question': f'q{i}', 'answer': f'#### {i}'} for i in range(20)]
  train = write_jsonl(tmp_path / 'train.jsonl', rows)
  config = gsm8k_files_config(train, str(tmp_path / 'never_read.jsonl'), eval_holdout=5)
  task = build_task(config)
  train_q = {r['question'] for r in task.train}
  eval_q = {r['question'] for r in task.eval}
  assert len(train_q) == 15 and len(eval_q) == 5 and not train_q & eval_q
  assert eval_q == {r['question'] for r in build_task(config).eval}  # deterministic
  config.seed = 1
  assert eval_q != {r['question'] for r in build_task(config).eval}
  config.max_train, config.max_eval = 4, 2
  task = build_task(config)
  assert len(task.train) == 4 and len(task.eval) == 2
  config.eval_holdout = 20
  with pytest.raises(ValueError, match='leaves no training rows'):
    build_task(config)


# --- errors name the file and the row ---------------------------------------------------
def test_missing_files(tmp_path):
  missing = str(tmp_path / 'gsm8k_train.jsonl')
  with pytest.raises(FileNotFoundError, match='gsm8k_train.jsonl'):
    build_task(gsm8k_files_config(missing, missing))
  with pytest.raises(FileNotFoundError, match='no file matches'):
    loading.read_files(str(tmp_path / 'shard-*.parquet'))
  with pytest.raises(FileNotFoundError, match='directory'):
    loading.read_files(str(tmp_path))
  with pytest.raises(ValueError, match='train_files is empty'):
    build_task(gsm8k_files_config('', ''))


def test_row_missing_a_field(tmp_path):
  rows = [GSM8K_TRAIN[0], {'question': 'no answer here'}]
  path = write_jsonl(tmp_path / 'train.jsonl', rows)
  with pytest.raises(ValueError, match=r"train.jsonl row 1 \(line 2\) has no field 'answer'.*answer_field"):
    build_task(gsm8k_files_config(path, path))
  path = write_parquet(tmp_path / 'train.parquet', [{'question': 'q', 'answer': '#### 1'}, {'question': 'q2', 'answer': None}])
  with pytest.raises(ValueError, match=r"train.parquet row 1 has no field 'answer'"):
    build_task(gsm8k_files_config(path, path))
  config = gsm8k_files_config(path, path, answer_field='solution')
  with pytest.raises(ValueError, match=r"row 0 has no field 'solution'"):
    build_task(config)


def test_malformed_rows(tmp_path):
  bad_json = tmp_path / 'bad.jsonl'
  bad_json.write_text(json.dumps(GSM8K_TRAIN[0]) + '\n\n{"question": oops}\n')
  with pytest.raises(ValueError, match=r'bad.jsonl line 3 \(row 1\): not valid JSON'):
    loading.read_files(str(bad_json))
  not_object = write_jsonl(tmp_path / 'list.jsonl', [[1, 2]])
  with pytest.raises(ValueError, match='row 0.*JSON object'):
    loading.read_files(not_object)
  no_hash = write_jsonl(tmp_path / 'nohash.jsonl', [GSM8K_TRAIN[0], {'question': 'q', 'answer': 'just 5'}])
  with pytest.raises(ValueError, match=r"nohash.jsonl row 1 \(line 2\): the answer field .* no '#### N'"):
    build_task(gsm8k_files_config(no_hash, no_hash))
  csv = tmp_path / 'data.csv'
  csv.write_text('question,answer\n')
  with pytest.raises(ValueError, match='unknown extension'):
    loading.read_files(str(csv))
  not_parquet = tmp_path / 'fake.parquet'
  not_parquet.write_text('hello')
  with pytest.raises(ValueError, match='fake.parquet: cannot read it as parquet'):
    loading.read_files(str(not_parquet))


def test_math_row_without_reference(tmp_path):
  rows = MATH_TRAIN[:1] + [{'problem': 'p', 'solution': 'no box here', 'level': 'Level 1', 'type': 'Algebra'}]
  config = task_config('math')
  config.source = 'files'
  config.train_files = config.eval_files = write_jsonl(tmp_path / 'm.jsonl', rows)
  with pytest.raises(ValueError, match=r"m.jsonl row 1 \(line 2\): no reference answer"):
    build_task(config)


def test_unknown_source():
  config = task_config('gsm8k')
  config.source = 's3'
  with pytest.raises(ValueError, match=r"source='s3'; expected one of \('hub', 'files', 'tfds'\)"):
    build_task(config)


def test_gsm8k_program_completions_scored_by_execution_when_enabled(tmp_path):
  path = write_jsonl(tmp_path / 'train.jsonl', GSM8K_TRAIN)
  config = gsm8k_files_config(path, path)
  program = 'def simple_math_problem() -> int:\n    boxes = 3\n    return boxes * 4\n'
  fn, _ = build_task(config).reward_fns[0]
  assert fn(['p'], [program], answer=['12']) == [0.0]          # off by default
  config.answer.execute_code = True
  task = build_task(config)
  fn, _ = task.reward_fns[0]
  assert fn(['p', 'p'], [program, '#### 12'], answer=['12', '12']) == [1.0, 1.0]
  assert task.formats(program) == 'code' and task.answer_key(program) == '12'


# --- empty data is an error at load time, naming the file and the split ------------------------
def empty_parquet(path):
  pq.write_table(pa.table({'question': pa.array([], pa.string()), 'answer': pa.array([], pa.string())}), str(path))
  return str(path)


@pytest.mark.parametrize('which', ['train', 'eval'])
@pytest.mark.parametrize('name,content', [('empty.jsonl', ''), ('blank.jsonl', '\n  \n\n'), ('empty.json', '[]'),
                                          ('empty.parquet', None)])
def test_empty_data_file_is_an_error_at_load_time(tmp_path, which, name, content):
  good = write_jsonl(tmp_path / 'good.jsonl', GSM8K_TRAIN)
  path = tmp_path / name
  if content is None:
    empty_parquet(path)
  else:
    path.write_text(content)
  files = {'train': good, 'eval': good}
  files[which] = f'{good},{path}' if which == 'train' else str(path)   # one empty shard among good ones counts too
  config = gsm8k_files_config(files['train'], files['eval'])
  with pytest.raises(ValueError) as info:
    loading.load_train_eval(config)
  message = str(info.value)
  assert f'config.task.{which}_files (the {which} split)' in message
  assert f'{str(path)!r} has no rows' in message and f'remove it from config.task.{which}_files' in message
  with pytest.raises(ValueError, match=f'the {which} split'):
    build_task(config)


@pytest.mark.parametrize('source,what', [('tfds', "tfds 'gsm8k'"), ('hub', "'openai/gsm8k' \\(config 'main'\\)")])
def test_empty_hub_or_tfds_split_is_an_error(monkeypatch, source, what):
  # tfds refuses an empty slice itself; a data set whose split is empty reaches load_split like this.
  no_rows = lambda *args: loading.Records([], [])
  monkeypatch.setattr(loading, 'load_tfds', no_rows)
  monkeypatch.setattr(loading, 'load_hub', no_rows)
  config = task_config('gsm8k')
  config.source, config.eval_split = source, 'test_empty'
  with pytest.raises(ValueError, match=rf"the train split 'train' of {what} has no rows; set config.task.train_split"):
    loading.load_split(config, 'train')
  with pytest.raises(ValueError, match=r"the eval split 'test_empty' .* has no rows; .*config.task.eval_split"
                                       r'.*eval_holdout'):
    loading.load_split(config, 'eval')


def test_max_train_zero_is_an_error(tmp_path):
  path = write_jsonl(tmp_path / 'train.jsonl', GSM8K_TRAIN)
  with pytest.raises(ValueError, match='config.task.max_train=0 leaves no training rows'):
    build_task(gsm8k_files_config(path, path, max_train=0))


# --- GSM8K references: the number that starts the final answer ---------------------------------
def test_gsm8k_reference_rule(tmp_path):
  finals = ['1,000.5 dollars', '$1,200', '-7', '-$3 (a loss)', '72.', '0.25 of the cake', '1/4', '15%']
  rows = [{'question': f'q{i}', 'answer': f'work <<1+1=2>>\n#### {f}'} for i, f in enumerate(finals)]
  path = write_jsonl(tmp_path / 'train.jsonl', rows)
  task = build_task(gsm8k_files_config(path, path))
  assert [r['answer'] for r in task.train] == ['1000.5', '1200', '-7', '-3', '72', '0.25', '0.25', '15']
  completions = ['#### 1000.5', 'The answer is 1,200.', '#### -7', '#### -3', '\\boxed{72}', '#### 1/4', '#### 0.25',
                 'The answer is 15%.']
  assert correctness_reward(['p'] * 8, completions, answer=[r['answer'] for r in task.train]) == [1.0] * 8
  assert correctness_reward(['p', 'p'], ['#### 1,000.5', '#### 1,000.5 dollars'], answer=['1000.5'] * 2) == [1.0, 1.0]
  assert correctness_reward(['p'], ['#### 1000.6'], answer=['1000.5']) == [0.0]


@pytest.mark.parametrize('final', ['Paris', 'about 12', 'twelve', '1,2345'])
def test_gsm8k_reference_without_a_number_names_the_row(tmp_path, final):
  rows = [GSM8K_TRAIN[0], {'question': 'q', 'answer': f'some work\n#### {final}'}]
  path = write_jsonl(tmp_path / 'train.jsonl', rows)
  with pytest.raises(ValueError, match=rf"train.jsonl row 1 \(line 2\): the final answer '#### {final}' does not "
                                       'start with a number'):
    build_task(gsm8k_files_config(path, path))
