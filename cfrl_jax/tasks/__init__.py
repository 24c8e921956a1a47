"""Tasks: prompts, reference answers, reward functions and format detectors.

    from cfrl_jax.tasks import build_task, task_config
    config = task_config('arithmetic')       # or 'gsm8k', 'math'
    config.max_ops = 2
    task = build_task(config)                # Task(train, eval, reward_fns, formats, ...)
"""
from cfrl_jax.tasks.base import Task
from cfrl_jax.tasks.registry import TASK_NAMES, build_task, task_config

__all__ = ['Task', 'TASK_NAMES', 'build_task', 'task_config']
