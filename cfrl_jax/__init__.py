"""cfrl_jax: classifier-first RL post-training of Qwen models, with exact empirical-NTK probes."""
