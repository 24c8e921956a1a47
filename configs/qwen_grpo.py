"""GRPO on GSM8K with Qwen2.5-1.5B-Instruct: the baseline for configs/qwen_cfrl.py (no classifier-first stage).

Same model, data, batch, learning rates and budget as qwen_cfrl.py; the head keeps its tie-free copy so the
two runs differ only by stage one. Hardware and time as qwen_cfrl.py.
Expected result: slower early rise of training reward and confidence than CF-GRPO.
"""
import importlib.util
import os


def get_config():
  spec = importlib.util.spec_from_file_location('qwen_cfrl', os.path.join(os.path.dirname(__file__), 'qwen_cfrl.py'))
  base = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(base)
  c = base.get_config()
  with c.unlocked():
    c.name = 'qwen_grpo'
    c.run_dir = 'runs/qwen_grpo'
    c.cfrl.enabled = False
  return c
