"""The schema of an experiment config: every field, its type and its default.

Experiment files in configs/ start from `base_config()` and change values only,
so any field is overridable from the command line (`--config.rl.lr=1e-6`) and
an unknown key or a wrong type is an error listing the valid keys.
"""
from __future__ import annotations

import ml_collections as mc

from cfrl_jax.rl.aggregate import AGGREGATION_MODES
from cfrl_jax.rl.algorithms import ALGORITHMS, algorithm
from cfrl_jax.rl.kl import KL_ESTIMATORS
from cfrl_jax.rl.reinforce import BASELINES
from cfrl_jax.tasks import task_config
from cfrl_jax.train.schedule import SCHEDULES, warmup_steps

# Fields that a config file's get_config(arg) reads while building the config: a command-line value
# would be set after they took effect, so the command line refuses them (main.py).
GET_CONFIG_FIELDS = ('smoke',)


def base_config(task: str = 'arithmetic') -> mc.ConfigDict:
  c = mc.ConfigDict()
  c.name = 'run'
  c.seed = 0
  c.seeds = ''              # study mode: comma-separated seeds, e.g. '0,1,2' (empty: just `seed`)
  c.run_dir = ''            # default: runs/<name>
  c.resume = False          # continue from the latest checkpoint in run_dir
  c.smoke = False           # a tiny, fast variant of the same experiment (tests, CI)
  c.arms = ''               # study mode: comma-separated arms, e.g. 'grpo,cfgrpo' (cfrl_jax/arms.py)
  c.report = True           # write report.md + PNGs into run_dir at the end
  c.compile_cache_dir = 'cache/jax'  # JAX persistent compilation cache (later runs skip compiles); '' disables

  c.study = mc.ConfigDict()
  c.study.arms = mc.ConfigDict()  # config-defined arms: {name: {section: {field: value}}} (cfrl_jax/arms.py)
  c.study.vary_base = False       # True: each RL seed pretrains its own base (pretrain.seed + seed), so the
                                  # spread over seeds includes the base; False: one shared base for all runs

  c.model = mc.ConfigDict()
  c.model.source = 'pretrained'  # 'pretrained' (HF dir / hub id) | 'pretrain' (from scratch) | 'init' (random)
  c.model.path = ''
  c.model.tie = 'untie'          # 'auto' (as the checkpoint) | 'tied' (HF semantics) | 'untie' (own head copy)
  c.model.dtype = 'float32'      # compute dtype
  c.model.param_dtype = 'float32'
  c.model.remat = False
  c.model.arch = mc.ConfigDict()  # for source 'pretrain' / 'init'
  c.model.arch.model_type = 'qwen2'
  c.model.arch.hidden_size = 192
  c.model.arch.intermediate_size = 512
  c.model.arch.num_layers = 4
  c.model.arch.num_heads = 6
  c.model.arch.num_kv_heads = 2
  c.model.arch.head_dim = 0      # 0: hidden_size // num_heads
  c.model.arch.rope_theta = 10000.0
  c.model.arch.tied = False
  c.model.arch.max_position_embeddings = 512

  c.tokenizer = mc.ConfigDict()
  c.tokenizer.path = ''          # default: the model's directory
  c.tokenizer.vocab_size = 160   # for the tokenizer trained from the task's text (source 'pretrain')

  c.task = task_config(task)

  c.pretrain = mc.ConfigDict()   # source 'pretrain': the from-scratch base model
  c.pretrain.steps = 300
  c.pretrain.batch_size = 128
  c.pretrain.lr = 3e-3
  c.pretrain.warmup_steps = 20
  c.pretrain.weight_decay = 0.01
  c.pretrain.num_examples = 40000
  c.pretrain.b2 = 0.95            # Adam's second-moment decay (0.95: the usual LM-pretraining choice)
  c.pretrain.batching = 'random'  # 'random' | 'length_sorted' (less padding, but one format per batch: learns slower)
  c.pretrain.loss_on_prompt = True  # next-token loss on prompt + completion (False: completion only)
  c.pretrain.length_bucket = 8    # completion lengths are padded to multiples of this (one compile per bucket)
  c.pretrain.micro_batches = 4    # a step's rows sorted by length into this many micro-batches, each cut to
                                  # its longest row (less padding computed); one optimizer step on their
                                  # token-weighted sum, equal to the whole batch's up to float order
  c.pretrain.cache_dir = 'cache'  # cached bases: <cache_dir>/base-<hash of the pretraining config>
  c.pretrain.seed = 0             # the base's own seed: RL seeds (config.seed) do not change the base
  # Stop at an accuracy, not a step count, so that bases from different CPUs (whose float order differs)
  # land in one band: every eval_every steps from eval_from, greedy accuracy on validation_problems
  # problems of the task's *train* patterns (never the held-out eval set); the first time the mean of the
  # last stop_window readings is at or above stop_accuracy ends the main phase, and `steps` is the
  # cap. 0 = off (run all `steps`). Then cooldown_steps anneal the learning rate linearly to zero, so the
  # saved base is a settled point, not one sample of the main phase's step-to-step jitter.
  c.pretrain.stop_accuracy = 0.0
  c.pretrain.stop_window = 1
  c.pretrain.cooldown_steps = 0
  c.pretrain.eval_every = 10
  c.pretrain.eval_from = 100
  c.pretrain.validation_problems = 256

  c.rl = mc.ConfigDict()
  c.rl.algorithm = 'grpo'        # grpo | reinforce | rloo | ppo | expert_iteration | sft (with cfrl: LP-FT)
  c.rl.sft_format = 'steps'      # sft on the arithmetic task: which solution format is the target
  c.rl.steps = 100
  c.rl.prompts_per_step = 16
  c.rl.group_size = 8
  c.rl.temperature = 1.0
  c.rl.top_p = 1.0
  c.rl.top_k = 0
  c.rl.max_new_tokens = 64
  c.rl.epochs = 1                # passes over each rollout
  c.rl.minibatches = 1           # updates per pass
  c.rl.micro_batches = 1         # >1: each minibatch's rows sorted by completion length into this many micro-
                                 # batches, each cut to its longest completion; one optimizer step on their
                                 # weighted sum, equal to the whole minibatch's up to float order (one device)
  c.rl.clip_low = 0.2
  c.rl.clip_high = 0.2           # DAPO's epsilon_high (e.g. 0.28)
  c.rl.kl_coef = 0.0             # 0: no reference model is kept or run
  c.rl.kl_estimator = 'k3'
  c.rl.aggregation = 'seq_mean'  # seq_mean (GRPO) | token_mean (DAPO) | constant (Dr. GRPO)
  c.rl.scale_by_std = True       # False: Dr. GRPO advantages
  c.rl.baseline = 'batch_mean'   # REINFORCE: none | batch_mean | group_mean | rloo
  c.rl.reinforce_style = 'plain'  # REINFORCE: 'plain' (the loss above, one update per rollout) | 'echo_chamber'
                                  # (Echo Chamber's code: k1 KL folded into per-token rewards, returns-to-go,
                                  # token-level whitening over the rollout, PPO's clipped loss; docs/echo_chamber.md)
  c.rl.recompute_old_logp = False  # True: old log-probs from a learner forward pass instead of the sampler's
  c.rl.lr = 1e-6                 # backbone (and head, unless head_lr > 0) in stage two / plain RL
  c.rl.head_lr = 0.0              # 0: rl.lr
  c.rl.head_lr_schedule = 'constant'  # 'cfrl_stage1': without CF-RL, the head's lr follows CF-RL's head schedule
                                      # (cfrl.stage1_head_lr for cfrl.stage1_steps steps, then rl.head_lr)
  c.rl.warmup_steps = 0
  c.rl.warmup_ratio = 0.0        # used when warmup_steps == 0: warmup = ceil(ratio * steps) (Echo Chamber: 0.03)
  c.rl.lr_schedule = 'constant'  # 'constant' (after warmup) | 'cosine' (decay to min_lr_ratio * lr at rl.steps)
  c.rl.min_lr_ratio = 0.0        # cosine's floor as a fraction of the lr (Echo Chamber: 0.1)
  c.rl.weight_decay = 0.0
  c.rl.grad_clip = 1.0
  c.rl.b1 = 0.9
  c.rl.b2 = 0.999
  c.rl.eps = 1e-8
  c.rl.ppo = mc.ConfigDict()
  c.rl.ppo.gamma = 1.0
  c.rl.ppo.lam = 0.95
  c.rl.ppo.value_clip = 0.2
  c.rl.ppo.critic_lr = 1e-5
  c.rl.ei = mc.ConfigDict()
  c.rl.ei.samples_per_prompt = 8
  c.rl.ei.threshold = 1.0
  c.rl.ei.sft_epochs = 2
  c.rl.ei.batch_size = 32
  c.rl.ei.scope = 'step'         # 'step': each step samples prompts_per_step prompts | 'epoch': each step is one
                                 # EI round over the whole training set (Echo Chamber's procedure)
  c.rl.ei.temperature = -1.0     # sampling temperature of EI rollouts; < 0: rl.temperature (Echo Chamber: 1.0)
  c.rl.ei.top_p = -1.0           # < 0: rl.top_p (Echo Chamber: 0.95)
  c.rl.ei.lr = -1.0              # SFT lr of an EI round; < 0: the rl lr schedule (Echo Chamber: 1e-4)
  c.rl.ei.from_base = False      # scope 'epoch': True = each round fine-tunes the base model on the current
                                 # model's samples (the original's offline EI); False = the current model (online)

  c.cfrl = mc.ConfigDict()
  c.cfrl.enabled = False         # True: stage one trains only the head (a config asks for CF-RL explicitly)
  c.cfrl.stage1_steps = 10
  c.cfrl.stage1_head_lr = 1e-5   # < 0: the stage-two head lr (rl.head_lr, or rl.lr when that is 0)
  c.cfrl.switch_on = 'steps'     # steps | reward | entropy | head_share (the NTK decides: the head's share of
                                 # the probe log-prob change, vs what the backbone would add, < threshold)
  c.cfrl.switch_threshold = 0.0  # reward >= / entropy <= / head_share < this ends stage one
  c.cfrl.switch_every = 1        # head_share: measured every this many stage-one steps (a backbone gradient each)
  c.cfrl.max_stage1_steps = 1000

  c.eval = mc.ConfigDict()
  c.eval.every = 10              # 0: never
  c.eval.num_problems = 512
  c.eval.samples = 4             # sampled completions per problem (pass@1 at temperature, pass@k)
  c.eval.temperature = -1.0      # < 0: the training temperature
  c.eval.pass_k = '1,4'
  c.eval.batch_size = 256

  c.probe = mc.ConfigDict()
  c.probe.every = 10             # 0: never
  c.probe.num_sequences = 8
  c.probe.positions = 4          # scored completion positions per probe sequence
  c.probe.formats = 'all'        # 'all': each probe prompt with every solution format of the task (rows
                                 # then ceil(num_sequences / formats)); 'first': its first reference only

  c.checkpoint = mc.ConfigDict()
  c.checkpoint.every = 50        # 0: only at the end
  c.checkpoint.max_to_keep = 0   # 0: keep all (the rank-1 analysis reads them)

  c.alpharl = mc.ConfigDict()     # AlphaRL run mode (cfrl_jax/alpharl.py); output in <run_dir>/alpharl/
  c.alpharl.enabled = False       # True: train an early window, predict the end from its rank-1 dynamics, evaluate
  c.alpharl.window = 0.4          # fraction of rl.steps trained before the fit, in (0, 1]
  c.alpharl.fit_every = 5         # checkpoint interval in the window: the fit's points (step 0 is the base)
  c.alpharl.continue_steps = 0    # then train this many steps from the extrapolated model; -1: the rest of rl.steps
  c.alpharl.continue_from = 'B'   # the extrapolated model the continuation starts from: 'A' | 'B' | 'expo'
  c.alpharl.keep = 'head'         # variant B: leaf groups kept at their window-end value (head,embed,norms,biases,other)
  c.alpharl.reference_run = ''    # full run of the same config (or its study dir; '{arm}', '{seed}' are filled in)
  c.alpharl.metric = 'pass@1'     # the eval metric reported (any key of the eval records)
  c.alpharl.expo = True           # also evaluate ExPO, theta_0 + (T / W) (theta_W - theta_0), as a baseline
  c.alpharl.released = True       # also the released AlphaRL predictor (PLS of s1*u1 vs accuracy; docs/alpharl.md)
  c.alpharl.pls_scale = True      # its PLS standardises coordinates (sklearn PLSRegression's default, as released)
  c.alpharl.expo_alphas = '0.5,1,2,4'  # tuned ExPO: alpha grid (T/W - 1 added), picked on selection problems; '': off
  c.alpharl.select_on = 'auto'    # selection problems: 'eval_rest' (eval rows after eval.num_problems) | 'train' | 'auto'
  c.alpharl.select_problems = -1  # how many; -1: eval.num_problems

  c.mesh = mc.ConfigDict()        # device mesh for the learner and sampler (cfrl_jax/sharding.py)
  c.mesh.shape = (1, -1, 1)       # (data, fsdp, tensor); -1 takes the remaining devices
  c.mesh.rules = ()               # ((regex, spec), ...) before the default rules; () = defaults only
  c.mesh.logical_rules = ()       # ((logical axis, mesh axes), ...) before sharding.LOGICAL_RULES, e.g.
                                  # (('mlp', None),) keeps MLP columns whole; the defaults generate the rules
  c.mesh.data_loading = 'per_host'  # several processes: 'per_host' = each samples and scores only its share of
                                    # the prompts (grpo/rloo/reinforce/ppo); 'global' = every process the whole batch

  c.log = mc.ConfigDict()
  c.log.tensorboard = True
  c.log.progress = True
  return c


def check_against_schema(config: mc.ConfigDict, schema: mc.ConfigDict | None = None, prefix: str = '') -> None:
  """Every key of `config` must exist in the schema (catches a misspelt field in a config file)."""
  schema = base_config(config.task.name) if schema is None else schema
  for key in config.keys():
    if key not in schema:
      raise ValueError(f'Unknown config key {prefix + key!r}. Valid keys here: {sorted(schema.keys())}.')
    # task: its own schema per task; study.arms: names chosen by the config (checked by arms.py).
    if isinstance(config[key], mc.ConfigDict) and key != 'task' and prefix + key != 'study.arms':
      check_against_schema(config[key], schema[key], f'{prefix}{key}.')


def _fail(field: str, value, need: str):
  raise ValueError(f'config.{field}={value!r}: {need}. Set it with --config.{field}=... or in the config file.')


def _one_of(c, field: str, choices):
  value = _get(c, field)
  if value not in choices:
    _fail(field, value, f'expected one of {tuple(choices)}')


def _at_least(c, field: str, low, *, strict: bool = False, why: str = ''):
  value = _get(c, field)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > low if strict else value >= low):
    _fail(field, value, f'it must be {">" if strict else ">="} {low}' + (f' ({why})' if why else ''))


def _within(c, field: str, low, high, *, open_low: bool = False, open_high: bool = False):
  value = _get(c, field)
  ok_low = value > low if open_low else value >= low
  ok_high = value < high if open_high else value <= high
  if not (ok_low and ok_high):
    _fail(field, value, f'it must lie in {"(" if open_low else "["}{low}, {high}{")" if open_high else "]"}')


def _get(c, field: str):
  for part in field.split('.'):
    c = c[part]
  return c


def validate(c: mc.ConfigDict) -> None:
  """Checks every field's type-independent range (types are checked by ml_collections) at load time.

  Raises a ValueError naming the field, its value and what it must be, so a bad value stops a run
  before the model loads or a base pretrains, not at the first rollout.
  """
  _at_least(c, 'seed', 0)
  try:
    seeds = parse_list(c.seeds, int)
  except ValueError:
    _fail('seeds', c.seeds, "expected comma-separated integers, e.g. '0,1,2'")
  if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
    _fail('seeds', c.seeds, 'seeds must be distinct integers >= 0')
  if not c.name:
    _fail('name', c.name, 'a run needs a name')

  _one_of(c, 'model.source', ('pretrained', 'pretrain', 'init'))
  _one_of(c, 'model.tie', ('auto', 'tied', 'untie'))
  for f in ('model.dtype', 'model.param_dtype'):
    _one_of(c, f, ('float32', 'bfloat16', 'float16', 'float64'))
  _one_of(c, 'model.arch.model_type', ('qwen2', 'qwen3'))
  for f in ('hidden_size', 'intermediate_size', 'num_layers', 'num_heads', 'num_kv_heads', 'max_position_embeddings'):
    _at_least(c, f'model.arch.{f}', 1)
  _at_least(c, 'model.arch.head_dim', 0)
  a = c.model.arch
  if a.num_heads % a.num_kv_heads:
    _fail('model.arch.num_kv_heads', a.num_kv_heads, f'it must divide model.arch.num_heads={a.num_heads}')
  if not a.head_dim and a.hidden_size % a.num_heads:
    _fail('model.arch.head_dim', a.head_dim, f'0 means hidden_size // num_heads, but num_heads={a.num_heads} '
          f'does not divide hidden_size={a.hidden_size}; set head_dim explicitly')
  _at_least(c, 'model.arch.rope_theta', 0, strict=True)
  _at_least(c, 'tokenizer.vocab_size', 1)

  p = 'pretrain'
  for f in ('steps', 'warmup_steps', 'seed'):
    _at_least(c, f'{p}.{f}', 0)
  for f in ('batch_size', 'num_examples', 'length_bucket', 'micro_batches'):
    _at_least(c, f'{p}.{f}', 1)
  _at_least(c, f'{p}.lr', 0, strict=True)
  _at_least(c, f'{p}.weight_decay', 0)
  _within(c, f'{p}.b2', 0, 1, open_high=True)
  _one_of(c, f'{p}.batching', ('random', 'length_sorted'))
  _within(c, f'{p}.stop_accuracy', 0, 1)
  for f in ('eval_every', 'validation_problems', 'stop_window'):
    _at_least(c, f'{p}.{f}', 1)
  for f in ('eval_from', 'cooldown_steps'):
    _at_least(c, f'{p}.{f}', 0)

  rl = c.rl
  _one_of(c, 'rl.algorithm', ALGORITHMS)
  _at_least(c, 'rl.steps', 0)
  _at_least(c, 'rl.prompts_per_step', 1)
  if algorithm(rl.algorithm).group_baseline(rl):
    _at_least(c, 'rl.group_size', 2, why=f'{rl.algorithm} takes its baseline from the other samples of a '
              "prompt's group; a group of one has none")
  _at_least(c, 'rl.group_size', 1)
  _at_least(c, 'rl.temperature', 0, strict=True)
  _within(c, 'rl.top_p', 0, 1, open_low=True)
  _at_least(c, 'rl.top_k', 0)
  _at_least(c, 'rl.max_new_tokens', 1)
  _at_least(c, 'rl.epochs', 1)
  _at_least(c, 'rl.minibatches', 1)
  _at_least(c, 'rl.micro_batches', 1)
  if (rl.prompts_per_step * rl.group_size) % rl.minibatches:
    _fail('rl.minibatches', rl.minibatches, f'it must divide the rollout batch of rl.prompts_per_step x '
          f'rl.group_size = {rl.prompts_per_step * rl.group_size} rows')
  _within(c, 'rl.clip_low', 0, 1, open_high=True)
  _at_least(c, 'rl.clip_high', 0)
  _at_least(c, 'rl.kl_coef', 0)
  _one_of(c, 'rl.kl_estimator', KL_ESTIMATORS)
  _one_of(c, 'rl.aggregation', AGGREGATION_MODES)
  _one_of(c, 'rl.baseline', BASELINES)
  _one_of(c, 'rl.reinforce_style', ('plain', 'echo_chamber'))
  # kl_in_returns: the Echo Chamber's REINFORCE (rl.algorithm='reinforce', rl.reinforce_style='echo_chamber')
  if algorithm(rl.algorithm).kl_in_returns(rl) and rl.baseline != 'group_mean':
    _fail('rl.baseline', rl.baseline, "reinforce_style='echo_chamber' subtracts the group mean, as the "
          "original's reinforce_baseline does; set rl.baseline='group_mean'")
  for f in ('lr', 'head_lr', 'warmup_steps', 'weight_decay', 'grad_clip'):
    _at_least(c, f'rl.{f}', 0)
  _one_of(c, 'rl.head_lr_schedule', ('constant', 'cfrl_stage1'))
  _one_of(c, 'rl.lr_schedule', SCHEDULES)
  _within(c, 'rl.warmup_ratio', 0, 1, open_high=True)
  _within(c, 'rl.min_lr_ratio', 0, 1)
  if rl.lr_schedule == 'cosine':
    warmup = warmup_steps(rl.warmup_steps, rl.warmup_ratio, rl.steps)
    if rl.steps and warmup >= rl.steps:
      _fail('rl.steps', rl.steps, f'a cosine schedule needs more steps than its warmup of {warmup}; lower '
            'rl.warmup_steps / rl.warmup_ratio')
  for f in ('b1', 'b2'):
    _within(c, f'rl.{f}', 0, 1, open_high=True)
  _at_least(c, 'rl.eps', 0, strict=True)
  _within(c, 'rl.ppo.gamma', 0, 1)
  _within(c, 'rl.ppo.lam', 0, 1)
  _at_least(c, 'rl.ppo.value_clip', 0)
  _at_least(c, 'rl.ppo.critic_lr', 0)
  for f in ('samples_per_prompt', 'sft_epochs', 'batch_size'):
    _at_least(c, f'rl.ei.{f}', 1)
  _one_of(c, 'rl.ei.scope', ('step', 'epoch'))
  for f in ('temperature', 'lr'):
    if rl.ei[f] == 0:
      _fail(f'rl.ei.{f}', 0.0, f'it must be > 0 (or < 0 for the rl setting)')
  if rl.ei.top_p >= 0:
    _within(c, 'rl.ei.top_p', 0, 1, open_low=True)
  if rl.ei.from_base and rl.ei.scope != 'epoch':
    _fail('rl.ei.from_base', True, "fine-tuning from the base each round needs whole-training-set rounds: "
          "set rl.ei.scope='epoch'")

  _at_least(c, 'cfrl.stage1_steps', 1 if c.cfrl.enabled and c.cfrl.switch_on == 'steps' else 0)
  if c.cfrl.stage1_head_lr == 0:
    _fail('cfrl.stage1_head_lr', 0.0, 'stage one trains only the head, so its lr must be > 0 '
          '(or < 0 for the stage-two head lr)')
  _one_of(c, 'cfrl.switch_on', ('steps', 'reward', 'entropy', 'head_share'))
  _at_least(c, 'cfrl.max_stage1_steps', 1)
  _at_least(c, 'cfrl.switch_every', 1)
  if c.cfrl.switch_on == 'head_share':
    _within(c, 'cfrl.switch_threshold', 0, 1, open_low=True, open_high=True)
  if rl.head_lr_schedule == 'cfrl_stage1':
    if c.cfrl.enabled:
      _fail('rl.head_lr_schedule', rl.head_lr_schedule, "it imitates CF-RL's head schedule without CF-RL; "
            'with cfrl.enabled=True the stages already set it (use constant)')
    if c.cfrl.switch_on != 'steps':
      _fail('rl.head_lr_schedule', rl.head_lr_schedule, "it follows a stage one of cfrl.stage1_steps steps, "
            f"which needs cfrl.switch_on='steps' (got {c.cfrl.switch_on!r})")

  _at_least(c, 'eval.every', 0)
  _at_least(c, 'eval.num_problems', 1)
  _at_least(c, 'eval.samples', 0)
  _at_least(c, 'eval.batch_size', 1)
  if c.eval.temperature == 0:
    _fail('eval.temperature', 0.0, 'sampled evaluation needs a temperature > 0 (< 0: the training '
          'temperature; greedy accuracy is always measured)')
  try:
    pass_k = parse_list(c.eval.pass_k, int)
  except ValueError:
    _fail('eval.pass_k', c.eval.pass_k, "expected comma-separated integers, e.g. '1,4'")
  if c.eval.samples and any(not 1 <= k <= c.eval.samples for k in pass_k):
    _fail('eval.pass_k', c.eval.pass_k, f'every k must lie in [1, eval.samples={c.eval.samples}]')
  _at_least(c, 'probe.every', 0)
  _at_least(c, 'probe.num_sequences', 1)
  _at_least(c, 'probe.positions', 1)
  _one_of(c, 'probe.formats', ('all', 'first'))
  _at_least(c, 'checkpoint.every', 0)
  _at_least(c, 'checkpoint.max_to_keep', 0)

  _within(c, 'alpharl.window', 0, 1, open_low=True)
  _at_least(c, 'alpharl.fit_every', 1)
  _at_least(c, 'alpharl.continue_steps', -1)

  shape = tuple(c.mesh.shape)
  if len(shape) != 3 or any(not isinstance(n, int) or (n < 1 and n != -1) for n in shape) or shape.count(-1) > 1:
    _fail('mesh.shape', shape, 'expected (data, fsdp, tensor): three integers >= 1, at most one -1 '
          '(the remaining devices)')
  _one_of(c, 'mesh.data_loading', ('per_host', 'global'))


def parse_list(s: str, cast=str) -> list:
  return [cast(x.strip()) for x in str(s).split(',') if x.strip()]
