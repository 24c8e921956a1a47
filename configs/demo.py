"""The embedded default: CF-GRPO vs GRPO on a synthetic multi-format arithmetic task, on a laptop CPU.

What it reproduces, at toy scale:
  * Echo Chamber (Zhao et al. 2025): a model pretrained from scratch on a mixture of solution formats
    (step-by-step sentences, compact <<a+b=c>> chains, direct answers); RL then collapses onto one format.
  * CF-RL (Tomihari 2026): training the classifier first raises confidence faster; the NTK probes show the
    head (R) and backbone (G) components of every update.
What it does: builds the task and its tokenizer, pretrains a 1.6M-parameter Qwen2-architecture model
(cached under cache/ after the first run), runs GRPO and CF-GRPO from the same base with the same seeds and
rollout budget, probes NTK components / confidence / diversity / formats, and writes runs/demo/report.md.
Base: the main phase (cosine over a 450-step cap) ends when the mean of the last two validation readings
(greedy, 256 train-pattern problems, every 10 steps from 250) reaches 0.65; then 30 cooldown steps anneal
the lr to zero. Four bases on one 2-core Intel Xeon (native, AVX2-only and SSE4.2-only XLA, whole-batch
steps; bench/bench_base_robustness.py) took 330-380 steps and scored held-out sampled pass@1 0.557-0.565
and greedy 0.85-0.93 (bench/RESULTS.md): that is the expected range.
Hardware and time: a 2-core x86-64 CPU. With XLA limited to AVX2 on a 2-core Intel Xeon the first run took
15.5 min (pretraining 6.2) and a cached run 9.2 min (bench/RESULTS.md, bench_demo_budget); the earlier
recipe (single-reading stop, no cooldown) took 23.7 / 13.7 min on a slower 2-core AMD EPYC. Expected
result: see configs/demo.py:study (3 seeds) rather than this 40-step one-seed run; there CF-GRPO is not
distinguishable from GRPO.
Tuning history is in the commit log.

  python -m cfrl_jax.main --config=configs/demo.py
  python -m cfrl_jax.main --config=configs/demo.py --config.arms=grpo,cfgrpo,ppo,expert_iteration --config.seeds=0,1
  python -m cfrl_jax.main --config=configs/demo.py:smoke     # < 1 minute, for tests
  python -m cfrl_jax.main --config=configs/demo.py:study     # the lr-matched CF-RL study (apply_study)
"""
from cfrl_jax.config import base_config


ARGS = ('', 'smoke', 'study')   # the values of configs/demo.py:<arg>


def get_config(arg: str = ''):
  if arg not in ARGS:
    raise ValueError(f'configs/demo.py:{arg} is not a variant of this config; valid: '
                     f'{", ".join("configs/demo.py" + (":" + a if a else "") for a in ARGS)}.')
  c = base_config('arithmetic')
  c.name = 'demo'
  c.run_dir = 'runs/demo'
  c.arms = 'grpo,cfgrpo'
  c.seeds = '0'

  set_base(c)

  c.rl.steps = 40                  # the study (apply_study) runs 100
  c.rl.prompts_per_step = 16
  c.rl.group_size = 8
  c.rl.temperature = 1.0
  c.rl.max_new_tokens = 48
  c.rl.lr = 5e-5
  c.rl.head_lr = 5e-5
  c.rl.clip_low = 0.2
  c.rl.clip_high = 0.28
  c.rl.aggregation = 'token_mean'

  c.cfrl.stage1_steps = 10
  c.cfrl.stage1_head_lr = 5e-4

  c.eval.every = 20
  c.eval.num_problems = 512
  c.eval.samples = 4
  c.eval.pass_k = '1,4'
  c.probe.every = 10
  c.checkpoint.every = 20

  if arg == 'smoke':
    apply_smoke(c)
  if arg == 'study':
    apply_study(c)
  c.lock()
  return c


def set_base(c):
  """The demo's from-scratch base: model shape, tokenizer, task ranges and pretraining (shared by
  configs/echo_chamber.py, so both use one cached base)."""
  c.model.source = 'pretrain'
  c.model.tie = 'untie'
  c.model.arch.hidden_size = 192
  c.model.arch.intermediate_size = 512
  c.model.arch.num_layers = 4
  c.model.arch.num_heads = 6
  c.model.arch.num_kv_heads = 2
  c.tokenizer.vocab_size = 160

  # Smaller numbers than the task's defaults (start <= 20, operands <= 9): a 1.6M model trained for
  # ten minutes then starts RL at a base accuracy that leaves room both ways.
  c.task.start_max = 20
  c.task.operand_max = 9

  c.pretrain.steps = 450           # the cap; the main phase ends at the validation band below
  c.pretrain.stop_accuracy = 0.65  # ... met by the mean of the last two readings (one reading jitters by ~0.1)
  c.pretrain.stop_window = 2
  c.pretrain.cooldown_steps = 30   # then the lr anneals to zero: the saved base is a settled point
  c.pretrain.eval_from = 250       # the band is never near before ~300 steps (bench/RESULTS.md readings)
  c.pretrain.eval_every = 10
  c.pretrain.batch_size = 128
  c.pretrain.lr = 3e-3
  c.pretrain.num_examples = 57600   # 450 x 128: no example repeats up to the cap


def apply_study(c):
  """The CF-RL study a reviewer would accept: lr-matched controls, three seeds, a 10-step eval grid.

  Arms (cfrl_jax/arms.py), all from one shared base (pretrain.seed) and paired by RL seed:
    grpo             plain GRPO, head and backbone at 5e-5
    cfgrpo           10 head-only steps at 5e-4, then everything at 5e-5 (the demo's CF-GRPO)
    grpo_headlr      plain GRPO whose head lr is cfgrpo's schedule step by step: "a bigger head step" alone
    cfgrpo_samelr    CF-GRPO with stage one at 5e-5: "the head first" alone
    cfgrpo_adaptive  CF-GRPO whose stage one ends when the head's share of the probe log-prob change
                     falls below 0.5 (at most 30 steps)
  The report gives per seed steps to target and AUC of held-out pass@1, and per designed comparison the
  paired difference with a 95% t interval over the 3 seeds.
  Hardware: a 2-core x86-64 CPU. Time: 15 runs of 100 steps with an eval every 10 steps; run here in three
  processes (one per seed) sharing a 2-core Intel Xeon with two other jobs (docs/study.md): 12-17 min per
  run while sharing, 3.8 h of run time, about 1.5 h wall including the 6-minute base.
  Result (README, generated; seeds 0-2, the cooled-down base): CF-GRPO not distinguishable from GRPO on
  steps to target, AUC or final pass@1; grpo_headlr reaches the target sooner and has a higher AUC than
  GRPO; cfgrpo_samelr's AUC is lower; cfgrpo_adaptive hits its 30-step cap in every seed (switch at 31)
  and reaches the target at step 20, in stage one; no arm's final pass@1 differs from GRPO's.
  """
  c.name = 'demo_study'
  c.run_dir = 'runs/demo_study'
  c.rl.steps = 100
  c.arms = 'grpo,cfgrpo,grpo_headlr,cfgrpo_samelr,cfgrpo_adaptive'
  c.seeds = '0,1,2'
  c.eval.every = 10
  c.cfrl.switch_threshold = 0.5
  c.cfrl.max_stage1_steps = 30
  c.rl.micro_batches = 4   # the learner on length-sorted micro-batches: the same steps, less padding computed


def apply_smoke(c):
  """Seconds instead of minutes: a tiny model, a few steps; exercises every part of the study.

  Its rewards vary within groups, so its RL updates are real and a learner or resume bug shows:
  one-operation problems on numbers <= 3 (answers 0-5), a base pretrained at a high lr that writes
  'The answer is n' after 40 steps, and the last number as the answer when no marker is found
  (partial credit for a model that only half learned the formats). Measured, seed 0, train
  reward_mean/std per step: GRPO 0.250/0.433, 0.062/0.242, 0.062/0.242; CF-GRPO 0.250/0.433,
  0.062/0.242, 0.188/0.390. With the previous settings (12 pretraining steps at lr 3e-3, numbers
  <= 20/9, no fallback, RL lr 5e-5) every reward of both arms was 0 and every loss 0.
  """
  c.smoke = True
  c.name = 'demo_smoke'
  c.run_dir = 'runs/demo_smoke'
  c.model.arch.hidden_size = 32
  c.model.arch.intermediate_size = 64
  c.model.arch.num_layers = 2
  c.model.arch.num_heads = 4
  c.model.arch.num_kv_heads = 2
  c.task.max_ops = 1
  c.task.start_max = 3
  c.task.operand_max = 2
  c.task.answer.last_number_fallback = True
  c.pretrain.steps = 40
  c.pretrain.stop_accuracy = 0.0   # a fixed 40 steps: the smoke base only has to write the formats
  c.pretrain.stop_window = 1
  c.pretrain.cooldown_steps = 0
  c.pretrain.batch_size = 32
  c.pretrain.num_examples = 1280
  c.pretrain.lr = 1e-2
  c.pretrain.length_bucket = 64
  c.pretrain.cache_dir = 'cache/smoke'
  c.rl.steps = 3
  c.rl.prompts_per_step = 4
  c.rl.group_size = 4
  c.rl.max_new_tokens = 32
  c.rl.lr = 1e-3
  c.rl.head_lr = 1e-3
  c.cfrl.stage1_steps = 1
  c.cfrl.stage1_head_lr = 1e-2
  c.eval.every = 3
  c.eval.num_problems = 16
  c.eval.samples = 2
  c.eval.pass_k = '1,2'
  c.probe.every = 2
  c.probe.num_sequences = 4
  c.checkpoint.every = 3
  c.alpharl.fit_every = 1   # the window of 3 steps is 1 step long
