"""The schema of an experiment config: every field, its type and its default.

Experiment files in configs/ start from `base_config()` and change values only,
so any field is overridable from the command line (`--config.rl.lr=1e-6`) and
an unknown key or a wrong type is an error listing the valid keys.
"""
from __future__ import annotations

import ml_collections as mc

from cfrl_jax.tasks import task_config


def base_config(task: str = 'arithmetic') -> mc.ConfigDict:
  c = mc.ConfigDict()
  c.name = 'run'
  c.seed = 0
  c.seeds = ''              # study mode: comma-separated seeds, e.g. '0,1,2' (empty: just `seed`)
  c.run_dir = ''            # default: runs/<name>
  c.resume = False          # continue from the latest checkpoint in run_dir
  c.smoke = False           # a tiny, fast variant of the same experiment (tests, CI)
  c.arms = ''               # study mode: comma-separated arms, e.g. 'grpo,cfgrpo' (see cfrl_jax/study.py)
  c.report = True           # write report.md + PNGs into run_dir at the end
  c.compile_cache_dir = 'cache/jax'  # JAX persistent compilation cache (later runs skip compiles); '' disables

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
  c.pretrain.cache_dir = 'cache'  # cached bases: <cache_dir>/base-<hash of the pretraining config>

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
  c.rl.clip_low = 0.2
  c.rl.clip_high = 0.2           # DAPO's epsilon_high (e.g. 0.28)
  c.rl.kl_coef = 0.0             # 0: no reference model is kept or run
  c.rl.kl_estimator = 'k3'
  c.rl.aggregation = 'seq_mean'  # seq_mean (GRPO) | token_mean (DAPO) | constant (Dr. GRPO)
  c.rl.scale_by_std = True       # False: Dr. GRPO advantages
  c.rl.baseline = 'batch_mean'   # REINFORCE: none | batch_mean | group_mean | rloo
  c.rl.recompute_old_logp = False  # True: old log-probs from a learner forward pass instead of the sampler's
  c.rl.lr = 1e-6                 # backbone (and head, unless head_lr > 0) in stage two / plain RL
  c.rl.head_lr = 0.0
  c.rl.warmup_steps = 0
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

  c.cfrl = mc.ConfigDict()
  c.cfrl.enabled = True
  c.cfrl.stage1_steps = 10
  c.cfrl.stage1_head_lr = 1e-5
  c.cfrl.switch_on = 'steps'     # steps | reward | entropy
  c.cfrl.switch_threshold = 0.0
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

  c.mesh = mc.ConfigDict()        # device mesh for the learner and sampler (cfrl_jax/parallel.py)
  c.mesh.shape = (1, -1, 1)       # (data, fsdp, tensor); -1 takes the remaining devices
  c.mesh.rules = ()               # ((regex, spec), ...) before the default rules; () = defaults only
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
    if isinstance(config[key], mc.ConfigDict) and key != 'task':
      check_against_schema(config[key], schema[key], f'{prefix}{key}.')


def parse_list(s: str, cast=str) -> list:
  return [cast(x.strip()) for x in str(s).split(',') if x.strip()]
