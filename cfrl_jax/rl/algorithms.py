"""The algorithms a run can name in config.rl.algorithm, and what each supports."""
ALGORITHMS = ('grpo', 'reinforce', 'rloo', 'ppo', 'expert_iteration', 'sft')
# With several processes and config.mesh.data_loading='per_host', these load, sample and score only
# each process's share of the prompts; Expert Iteration and SFT build the whole batch on every process.
PER_HOST_ALGORITHMS = ('grpo', 'reinforce', 'rloo', 'ppo')
# Advantages from statistics over a prompt's group of samples: a group of one has no baseline.
GROUP_ALGORITHMS = ('grpo', 'rloo')
