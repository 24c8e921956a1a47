"""Multi-host start: how this process joins a multi-process run (`jax.distributed.initialize`).

One Python process per host (or per GPU) runs the same program; `initialize_distributed` reads the
launch environment (explicit CFRL_* variables, SLURM, Cloud TPU, or JAX's own cluster detection),
must run before anything touches a device, and is a no-op for a single process. The mesh all
processes then share is built by cfrl_jax/sharding.py.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Mapping

import jax

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
  """Arguments for jax.distributed.initialize; None fields are left to JAX's cluster detection."""
  coordinator: str | None
  num_processes: int | None
  process_id: int | None
  local_device_ids: tuple[int, ...] | None
  source: str                # where they came from, for the log
  detect: bool = False       # True: let JAX detect the cluster (Cloud TPU pods, ...)


ENV_COORDINATOR = 'CFRL_COORDINATOR'          # host:port of process 0
ENV_NUM_PROCESSES = 'CFRL_NUM_PROCESSES'
ENV_PROCESS_ID = 'CFRL_PROCESS_ID'
ENV_LOCAL_DEVICE_IDS = 'CFRL_LOCAL_DEVICE_IDS'  # e.g. '0' (one GPU per process) or '0,1,2,3'
ENV_DISTRIBUTED = 'CFRL_DISTRIBUTED'          # 'auto' (JAX detects: TPU pods, ...) | 'off'
ENV_COORDINATOR_PORT = 'CFRL_COORDINATOR_PORT'  # SLURM without CFRL_COORDINATOR: port on the first node


def first_slurm_host(nodelist: str) -> str:
  """The first hostname of a SLURM node list: 'gpu[003-007,010],cpu1' -> 'gpu003'."""
  m = re.match(r'([^,\[]+)(\[([^\]]+)\])?', nodelist.strip())
  if not m:
    raise ValueError(f'cannot parse SLURM node list {nodelist!r}; set {ENV_COORDINATOR}=host:port.')
  prefix, ranges = m.group(1), m.group(3)
  return prefix if ranges is None else prefix + re.split(r'[,-]', ranges)[0]


def _int_env(env, name) -> int:
  try:
    return int(env[name])
  except ValueError:
    raise ValueError(f'{name}={env[name]!r} is not an integer.') from None


def launch_spec(env: Mapping[str, str] | None = None, *, coordinator: str | None = None,
                num_processes: int | None = None, process_id: int | None = None) -> LaunchSpec | None:
  """How this process joins a multi-process run, or None for a single process.

  Priority: explicit arguments, then CFRL_COORDINATOR / CFRL_NUM_PROCESSES / CFRL_PROCESS_ID
  (+ CFRL_LOCAL_DEVICE_IDS), then CFRL_DISTRIBUTED=auto (JAX's own detection: Cloud TPU pods,
  Open MPI, Kubernetes, SLURM), then a SLURM job step of several tasks (srun), then a GKE TPU pod
  (TPU_WORKER_HOSTNAMES with several hosts). CFRL_DISTRIBUTED=off forces a single process.
  """
  env = os.environ if env is None else env
  local = env.get(ENV_LOCAL_DEVICE_IDS)
  local_ids = tuple(int(i) for i in local.split(',') if i.strip()) if local else None
  explicit = {'coordinator': coordinator if coordinator is not None else env.get(ENV_COORDINATOR),
              'num_processes': num_processes if num_processes is not None else (
                  _int_env(env, ENV_NUM_PROCESSES) if ENV_NUM_PROCESSES in env else None),
              'process_id': process_id if process_id is not None else (
                  _int_env(env, ENV_PROCESS_ID) if ENV_PROCESS_ID in env else None)}
  mode = env.get(ENV_DISTRIBUTED, '').strip().lower()
  if mode not in ('', 'auto', 'off'):
    raise ValueError(f"{ENV_DISTRIBUTED}={env[ENV_DISTRIBUTED]!r}; expected 'auto', 'off' or unset.")
  if mode == 'off':
    return None
  given = {k: v for k, v in explicit.items() if v is not None}
  slurm = 'SLURM_STEP_NODELIST' in env and 'SLURM_PROCID' in env and int(
      env.get('SLURM_STEP_NUM_TASKS', env.get('SLURM_NTASKS', '1'))) > 1
  if given and len(given) < 3 and not slurm:
    missing = sorted(set(explicit) - set(given))
    raise ValueError(f'multi-process launch is missing {missing}: give coordinator (host:port), '
                     f'num_processes and process_id (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}).')
  if len(given) == 3:
    _check_launch(explicit['coordinator'], explicit['num_processes'], explicit['process_id'])
    return LaunchSpec(explicit['coordinator'], explicit['num_processes'], explicit['process_id'], local_ids,
                      'arguments / CFRL_* environment')
  if mode == 'auto':
    return LaunchSpec(None, None, None, local_ids, 'JAX cluster detection', detect=True)
  if slurm:
    n = explicit['num_processes'] or int(env.get('SLURM_STEP_NUM_TASKS', env.get('SLURM_NTASKS')))
    pid = explicit['process_id'] if explicit['process_id'] is not None else _int_env(env, 'SLURM_PROCID')
    coord = explicit['coordinator']
    if coord is None:
      port = env.get(ENV_COORDINATOR_PORT) or str(61000 + _int_env(env, 'SLURM_JOB_ID') % 4000)
      coord = f"{first_slurm_host(env['SLURM_STEP_NODELIST'])}:{port}"
    if local_ids is None and _tasks_on_this_node(env) > 1:
      local_ids = (_int_env(env, 'SLURM_LOCALID'),)   # one process per GPU
    _check_launch(coord, n, pid)
    return LaunchSpec(coord, n, pid, local_ids, 'SLURM')
  hosts = env.get('TPU_WORKER_HOSTNAMES', '')
  if len([h for h in hosts.split(',') if h.strip()]) > 1 or env.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return LaunchSpec(None, None, None, None, 'Cloud TPU environment', detect=True)
  return None


def _tasks_on_this_node(env) -> int:
  """SLURM tasks on this node, from SLURM_TASKS_PER_NODE ('8(x2)' or '8,4') and SLURM_NODEID."""
  spec = env.get('SLURM_STEP_TASKS_PER_NODE') or env.get('SLURM_TASKS_PER_NODE')
  if not spec:
    return 1
  counts = []
  for part in spec.split(','):
    m = re.fullmatch(r'(\d+)(\(x(\d+)\))?', part.strip())
    if not m:
      return 1
    counts += [int(m.group(1))] * int(m.group(3) or 1)
  node = int(env.get('SLURM_NODEID', 0))
  return counts[node] if node < len(counts) else counts[-1]


def _check_launch(coordinator, num_processes, process_id):
  if not re.fullmatch(r'.+:\d+', str(coordinator)):
    raise ValueError(f'coordinator {coordinator!r} must be host:port, e.g. 10.0.0.1:12345.')
  if not (isinstance(num_processes, int) and num_processes >= 1):
    raise ValueError(f'num_processes={num_processes!r} must be a positive int.')
  if not (isinstance(process_id, int) and 0 <= process_id < num_processes):
    raise ValueError(f'process_id={process_id!r} must lie in [0, num_processes={num_processes}).')


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, env: Mapping[str, str] | None = None,
                           initialization_timeout: int = 300) -> bool:
  """jax.distributed.initialize from the launch environment; True when this is a multi-process run.

  A no-op (False) for a single process without launch variables. Must run before anything touches a
  device (jax.devices(), an array, a jit call); main.py calls it first. Idempotent.
  """
  spec = launch_spec(env, coordinator=coordinator, num_processes=num_processes, process_id=process_id)
  if spec is None:
    return False
  if jax.distributed.is_initialized():
    return True
  kw = dict(coordinator_address=spec.coordinator, num_processes=spec.num_processes, process_id=spec.process_id,
            local_device_ids=list(spec.local_device_ids) if spec.local_device_ids is not None else None,
            initialization_timeout=initialization_timeout)
  if not spec.detect:
    kw['cluster_detection_method'] = 'deactivate'   # ours are complete; JAX's SLURM guess would pin one GPU
  log.info('jax.distributed.initialize via %s: %s', spec.source, {k: v for k, v in kw.items() if v is not None})
  jax.distributed.initialize(**kw)
  log.info('process %d of %d, %d local / %d global devices', jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count())
  return True


def is_main_process() -> bool:
  """True on process 0: the one that writes logs, reports and metrics files."""
  return jax.process_index() == 0
