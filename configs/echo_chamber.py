"""Echo Chamber's RL settings (Zhao et al. 2025, as their released code runs them) on the arithmetic task.

Run once (seed 0; README, generated). docs/echo_chamber.md maps every setting to the original's file.

Command, hardware, time:
  python -m cfrl_jax.main --config=configs/echo_chamber.py           # the study: 4 arms, seed 0
  python -m cfrl_jax.main --config=configs/echo_chamber.py:smoke     # tiny model, 3 steps per arm
  A CPU job (the demo's 1.6M-parameter model; no accelerator needed, more cores run it faster). It reuses
  the demo's cached base (or pretrains it once), then runs 100 RL steps of 8 prompts x 8 samples for each
  of ppo, grpo and reinforce and 10 EI rounds over 512 prompts x 8 samples, with a 512-problem eval every
  10 steps.
  Time: 73.5 min on a 2-core Intel Xeon shared with the CF-RL study (PPO 18.5, GRPO 13.9,
  REINFORCE 13.9, EI 27.3 min), base from the cache.
  Result (seed 0, the demo's cooled-down base): GRPO and REINFORCE collapse onto the step-by-step format
  (held-out samples 0.52 -> 0.99 / 1.00), PPO drifts towards it (0.79), EI towards compact (0.49); no
  collapse falls in the interval of the largest pass@1 rise. One seed: no interval.

What the report shows (runs/echo_chamber/report.md, written when the study ends; cfrl_jax.report):
  echo_chamber.png, one panel per arm: the fraction of training samples in each solution format over RL
  steps (train format_<name>; 9-step moving average, the raw per-step curve faint, a min-max band over seeds
  when there are several) with held-out pass@1 at T 0.7 (solid) and greedy accuracy (dashed) on a second
  axis. Its "Echo Chamber" section tables, per arm and format, the eval fractions of sampled (T 0.7) and
  greedy completions at the base and at the end, and says whether the collapse onto one format (its
  smoothed share, 'unknown' aside, first >= 0.9) falls in the eval interval of the largest pass@1 rise.

Settings carried over (configs/pretraining_1b_sweeps_ppo_grpo_gsm8k.yaml, cli/train_ppo_ray.py,
ppo_utils/experience_maker.py, models/loss.py, cli/train_ei.py, configs/*_ei.yaml):
  * rollout: 64 prompts x 8 samples, train batch 64 -> 8 minibatch updates per rollout. CPU scale here:
    8 prompts x 8 samples = 64 rows, rl.minibatches = 8 (8 rows per update), so clipping acts as there;
  * loss: per-sequence token mean, then mean over sequences (rl.aggregation='seq_mean'); clip 0.2 both sides;
  * sampling temperature 0.7; Adam b1 0.9, b2 0.95; cosine lr with 3% warmup to a floor of 0.1 * lr;
  * KL coefficient 1e-3 (their sweep: 0, 1e-3, 1e-2): k1 in the reward for PPO and REINFORCE, k3 as a loss
    for GRPO (their use_kl_loss);
  * PPO: GAE gamma 1, lambda 0.95, whitened advantages (already ours);
  * REINFORCE: rl.reinforce_style='echo_chamber' (group-mean baseline, k1 KL in the reward, token whitening,
    PPO's clipped loss);
  * Expert Iteration: one round per step over the whole training set (rl.ei.scope='epoch'), k samples per
    prompt at T 1.0 / top_p 0.95, keep correct, de-duplicate, SFT 2 epochs at lr 1e-4 from the base
    (offline; rl.ei.from_base=False is their "online"). k = 8 here instead of 64 (CPU), on a 512-prompt
    training subset (task.num_train).
Arms: ppo, grpo, reinforce, expert_iteration (config-defined below, each with the original's KL estimator).
Our lrs are the demo's scale (5e-5; the original's 1e-6 for a 1B model does not move a 1.6M model).

Overrides for the paper's GSM8K scale (a TPU/GPU run, not this CPU):
  --config.task.name=gsm8k (and its model/tokenizer: --config.model.source=pretrained --config.model.path=...)
  --config.rl.prompts_per_step=64 --config.rl.group_size=8 --config.rl.minibatches=8
  --config.rl.max_new_tokens=1024 --config.rl.lr=1e-6 --config.rl.ppo.critic_lr=7e-6
  --config.rl.steps=1170   (10 episodes over GSM8K's 7473 problems at 64 prompts per rollout)
  --config.rl.ei.samples_per_prompt=64 --config.rl.ei.batch_size=256 --config.rl.ei.lr=1e-4
  --config.task.formats.scheme=substring   (their labels: <llm-code> / 'def' / text)
"""
from cfrl_jax.config import base_config
from configs import demo

ARGS = ('', 'smoke')


def get_config(arg: str = ''):
  if arg not in ARGS:
    raise ValueError(f'configs/echo_chamber.py:{arg} is not a variant of this config; valid: '
                     f'{", ".join("configs/echo_chamber.py" + (":" + a if a else "") for a in ARGS)}.')
  c = base_config('arithmetic')
  c.name = 'echo_chamber'
  c.run_dir = 'runs/echo_chamber'
  c.arms = 'ppo,grpo,reinforce,expert_iteration'
  c.seeds = '0'

  demo.set_base(c)   # the demo's base: one cached base for both

  rl = c.rl
  rl.steps = 100
  rl.prompts_per_step = 8
  rl.group_size = 8
  rl.minibatches = 8
  rl.epochs = 1
  rl.temperature = 0.7
  rl.top_p = 1.0
  rl.max_new_tokens = 48
  rl.aggregation = 'seq_mean'
  rl.clip_low = rl.clip_high = 0.2
  rl.b1, rl.b2 = 0.9, 0.95
  rl.lr = 5e-5
  rl.lr_schedule = 'cosine'
  rl.warmup_ratio = 0.03
  rl.min_lr_ratio = 0.1
  rl.kl_coef = 1e-3
  rl.kl_estimator = 'k1'
  rl.scale_by_std = True
  rl.baseline = 'group_mean'
  rl.reinforce_style = 'echo_chamber'
  rl.ppo.gamma, rl.ppo.lam = 1.0, 0.95
  rl.ei.scope = 'epoch'
  rl.ei.samples_per_prompt = 8
  rl.ei.temperature = 1.0
  rl.ei.top_p = 0.95
  rl.ei.sft_epochs = 2
  rl.ei.lr = 1e-4
  rl.ei.from_base = True
  rl.ei.batch_size = 64
  c.task.num_train = 512
  c.cfrl.enabled = False

  c.study.arms = {
      'ppo': {'rl': {'algorithm': 'ppo', 'kl_estimator': 'k1'}, 'cfrl': {'enabled': False}},
      'grpo': {'rl': {'algorithm': 'grpo', 'kl_estimator': 'k3'}, 'cfrl': {'enabled': False}},
      'reinforce': {'rl': {'algorithm': 'reinforce', 'kl_estimator': 'k1'}, 'cfrl': {'enabled': False}},
      # 10 rounds over the training set (the RL arms see 100 x 8 = 800 prompts)
      'expert_iteration': {'rl': {'algorithm': 'expert_iteration', 'steps': 10}, 'cfrl': {'enabled': False}},
  }

  c.eval.every = 10
  c.eval.num_problems = 512
  c.eval.samples = 4
  c.eval.pass_k = '1,4'
  c.probe.every = 10
  c.checkpoint.every = 20

  if arg == 'smoke':
    apply_smoke(c)
  c.lock()
  return c


def apply_smoke(c):
  """A tiny model and three steps per arm: exercises every arm's Echo Chamber path end to end."""
  c.smoke = True
  c.name = 'echo_chamber_smoke'
  c.run_dir = 'runs/echo_chamber_smoke'
  c.model.arch.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
  c.task.update(max_ops=1, start_max=3, operand_max=2, num_train=16)
  c.task.answer.last_number_fallback = True
  c.pretrain.update(steps=40, batch_size=32, num_examples=1280, lr=1e-2, length_bucket=64,
                    cache_dir='cache/smoke', stop_accuracy=0.0)
  c.rl.update(steps=3, prompts_per_step=4, group_size=4, minibatches=4, max_new_tokens=32, lr=1e-3)
  c.rl.ei.update(samples_per_prompt=2, batch_size=8)
  c.study.arms.expert_iteration.rl.steps = 2
  c.eval.update(every=3, num_problems=16, samples=2, pass_k='1,2')
  c.probe.update(every=0)
  c.checkpoint.every = 3
