"""Answers of program-format completions (TinyGSM / OpenMathInstruct-1 style), run out of process.

    runner = CodeRunner(timeout_s=2.0, memory_mb=512)
    runner.answer('def solution():\\n    return 7 + 5 - 3')   -> '9'
    runner.answers([...])                                    -> list of str | None (in parallel)

Off by default (config.task.answer.execute_code). Model output is never evaluated in this
process. Each program runs in a fresh `python -I -B` child in a fresh temporary working
directory (made by the parent, removed afterwards). Before the program is read the child
sets up, in this order (docs/sandbox.md says what each layer stops and what none of them does):

  kernel layers, which hold whatever the program executes:
  - a new pid and network namespace where the kernel allows it (a user namespace too when not
    root): the program runs as the namespace's init, so it cannot name processes outside, and
    every process it could leave behind dies with it; no network interface is up;
  - rlimits: CPU seconds, address space, file size 0, no core dumps, 64 descriptors, no new
    processes (binding because the program never runs as root);
  - as root: a fresh unprivileged uid/gid per run, no groups, no capabilities except
    CAP_DAC_READ_SEARCH when the interpreter is not world-readable; always no-new-privileges
    and SIGKILL when its parent dies;
  - Landlock where the kernel has it: no file written, created, removed, renamed, truncated or
    executed anywhere; no TCP; no signals to processes outside the sandbox.
  interpreter layer, held by state the program cannot reach (default arguments of a closure):
  - an audit hook that refuses sockets, process creation, exec, cffi, file writes, removals,
    renames, permission changes, signals, tracing and gc introspection; os.mkfifo, os.mknod and
    signal.pidfd_send_signal, which raise no audit event, are removed. ctypes (which numpy and
    sympy import) can overwrite any memory, the hook's included, so it is importable only where
    the pid namespace and Landlock hold on their own.
The parent stops reading at the wall-clock limit or after 1 MiB of output, then SIGKILLs every
process in the child's session or process group, below it, or running as its uid.
Files stay readable; see docs/sandbox.md for what else is not isolated.

The answer of a program is the return value of the function it names (config
`function_name`), or of the last zero-argument function it defines; a program without one
(OpenMathInstruct-1 style) answers with the last non-empty line it prints.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import re
import secrets
import selectors
import signal
import stat
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple, Sequence

_FENCED_RE = re.compile(r'```(?:python|py)?[ \t]*\n([\s\S]*?)```')
_LLM_CODE_RE = re.compile(r'<llm-code>([\s\S]*?)</llm-code>')
_DEF_RE = re.compile(r'(?m)^def [A-Za-z_]')
# One thread per numerical library: the child may not start threads (RLIMIT_NPROC is 0).
_CHILD_ENV = {'PATH': '/usr/bin:/bin', 'LC_ALL': 'C.UTF-8', 'OMP_NUM_THREADS': '1',
              'OPENBLAS_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'NUMEXPR_NUM_THREADS': '1'}
_MAX_OUTPUT = 2**20      # bytes the parent reads from one child; the result line is < 1 KiB

# Runs inside the child as `python -I -B -c _RUNNER`. Reads {'code', 'function', 'limits', 'nonce',
# 'ids', 'read_search', 'audit_hook'} as JSON on stdin. Everything it needs after the program
# starts is held in local variables and default arguments: the program can rebind module globals
# and builtins but cannot reach these.
_RUNNER = r'''
def _setup(req):
  """Namespaces, limits, privileges and Landlock, in that order; returns the layers in force.
  ctypes objects live only here: an already-resolved ctypes function is callable without an
  audit event, so none may outlive this frame."""
  import ctypes, os, resource, sys
  libc = ctypes.CDLL(None, use_errno=True)
  libc.syscall.restype = ctypes.c_long
  layers = []
  root = os.geteuid() == 0
  # A new pid namespace needs a fork: the forked child is its init, and when the init dies the
  # kernel kills every process left in the namespace. A root parent may not enter a user
  # namespace (the unprivileged ids below would be unmapped there).
  userns = 0 if root else 0x10000000                                    # CLONE_NEWUSER
  if libc.unshare(userns | 0x20000000 | 0x40000000) == 0:             # CLONE_NEWPID | CLONE_NEWNET
    layers += ['pid namespace', 'network namespace']
    pid = os.fork()
    if pid:
      # The outer process only relays the exit status; it runs no program code.
      code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
      os._exit(code if code >= 0 else 128 - code)
  elif libc.unshare(userns | 0x40000000) == 0:
    layers.append('network namespace')
  for name, value in (('RLIMIT_CPU', req['limits']['cpu_s']), ('RLIMIT_AS', req['limits']['memory_bytes']),
                      ('RLIMIT_FSIZE', 0), ('RLIMIT_CORE', 0), ('RLIMIT_NOFILE', 64), ('RLIMIT_NPROC', 0)):
    resource.setrlimit(getattr(resource, name), (value, value))
  if root:
    uid, gid = req['ids']
    for cap in range(64):                                   # empty bounding set (PR_CAPBSET_DROP)
      if libc.prctl(24, cap, 0, 0, 0) != 0:
        break
    libc.prctl(8, 1, 0, 0, 0)                               # PR_SET_KEEPCAPS across the uid change
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    keep = 1 << 2 if req['read_search'] else 0              # CAP_DAC_READ_SEARCH, to read the interpreter
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)           # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)(keep, keep, 0, 0, 0, 0)    # effective, permitted, inheritable (x2)
    if libc.capset(header, data) != 0:
      raise OSError(ctypes.get_errno(), 'capset failed')
    status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines() if ':' in l)
    if status['Uid'].split() != [str(uid)] * 4 or int(status['CapEff'], 16) != keep or int(status['CapPrm'], 16) != keep:
      raise OSError('the privilege drop did not take effect')
    layers.append(f'uid {uid}' + (' (+CAP_DAC_READ_SEARCH)' if keep else ''))
  libc.prctl(1, 9, 0, 0, 0)                                 # PR_SET_PDEATHSIG: SIGKILL when the outer dies
  if libc.prctl(38, 1, 0, 0, 0) != 0:                       # PR_SET_NO_NEW_PRIVS
    raise OSError(ctypes.get_errno(), 'PR_SET_NO_NEW_PRIVS failed')
  abi = libc.syscall(444, None, 0, 1)                       # landlock_create_ruleset(VERSION)
  if abi >= 1:
    # Handled rights that no rule grants are denied everywhere: executing, writing, truncating,
    # creating, removing and renaming files; TCP; signals and abstract sockets leaving the domain.
    fs = 0x1 | 0x2 | 0x10 | 0x20 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800 | 0x1000
    fs |= 0x2000 if abi >= 2 else 0                         # REFER
    fs |= 0x4000 if abi >= 3 else 0                         # TRUNCATE
    attr = (ctypes.c_uint64 * 3)(fs, 0x3 if abi >= 4 else 0, 0x3 if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    fd = libc.syscall(444, attr, size, 0)
    if fd < 0 or libc.syscall(446, fd, 0) != 0:             # landlock_restrict_self
      raise OSError(ctypes.get_errno(), 'Landlock refused the ruleset')
    os.close(fd)
    layers.append(f'landlock abi {abi}')
  # Functions that change the system without an audit event.
  import _signal, posix
  for module, names in ((os, ('mkfifo', 'mknod', 'posix_fallocate', 'sendfile', 'pidfd_open')),
                        (posix, ('mkfifo', 'mknod', 'posix_fallocate', 'sendfile', 'pidfd_open')),
                        (_signal, ('pidfd_send_signal',)), (sys.modules.get('signal'), ('pidfd_send_signal',))):
    for name in names:
      if module is not None and hasattr(module, name):
        delattr(module, name)
  return layers


def _make_hook(allow_ctypes, frozenset=frozenset, PermissionError=PermissionError, int=int, len=len,
               str=str, type=type):
  blocked = (
      'socket.', 'subprocess.', 'os.exec', 'os.spawn', 'os.posix_spawn', 'os.fork', 'os.system',
      'os.kill', 'os.killpg', 'os.remove', 'os.rename', 'os.rmdir', 'os.mkdir', 'os.chmod', 'os.chown',
      'os.chflags', 'os.truncate', 'os.utime', 'os.setxattr', 'os.removexattr', 'os.symlink', 'os.link',
      'os.startfile', 'shutil.', 'pty.', 'ctypes.', 'mmap.', 'fcntl.',
      'resource.', 'signal.', 'sqlite3.', 'urllib.', 'http.', 'ftplib.', 'smtplib.', 'poplib.',
      'imaplib.', 'nntplib.', 'telnetlib.', 'webbrowser.', 'sys.addaudithook', 'sys.settrace',
      'sys.setprofile', 'gc.get_')
  # Modules that reach the system around the audit events (their own C calls).
  imports = frozenset(('cffi', '_cffi_backend', 'posix', '_signal', 'sqlite3', '_sqlite3', 'dbm', '_dbm',
                       '_gdbm', 'readline') + (() if allow_ctypes else ('ctypes', '_ctypes')))
  write_flags = 0o1 | 0o2 | 0o100 | 0o1000 | 0o2000                 # O_WRONLY O_RDWR O_CREAT O_TRUNC O_APPEND

  def hook(event, args, blocked=blocked, imports=imports, write_flags=write_flags,
           startswith=str.startswith, partition=str.partition, has=str.__contains__,
           member=frozenset.__contains__, PermissionError=PermissionError, int=int, len=len, str=str,
           type=type, tuple=tuple):
    if type(event) is not str or type(args) is not tuple:
      raise PermissionError('blocked in the code sandbox: malformed audit event')
    if startswith(event, blocked):
      raise PermissionError('blocked in the code sandbox: ' + event)
    if event == 'open':
      mode = args[1] if len(args) > 1 else None
      flags = args[2] if len(args) > 2 else None
      if (type(flags) is not int or flags & write_flags or
          (type(mode) is str and (has(mode, 'w') or has(mode, 'a') or has(mode, 'x') or has(mode, '+')))):
        raise PermissionError('blocked in the code sandbox: opening files for writing')
    elif event == 'import':
      if len(args) < 1 or type(args[0]) is not str or member(imports, partition(args[0], '.')[0]):
        raise PermissionError('blocked in the code sandbox: import of ' + (args[0] if len(args) and type(args[0]) is str else '?'))
  return hook


def _runner(type=type, str=str, callable=callable, getattr=getattr, BaseException=BaseException):
  # Builtins as default arguments: the program may rebind them before the result is formatted.
  import builtins, io, json, os, sys
  write, dumps, StringIO, exit = os.write, json.dumps, io.StringIO, os._exit
  builtin_names, saved_builtins, clear, update = builtins.__dict__, dict(builtins.__dict__), dict.clear, dict.update
  setup, make_hook = _setup, _make_hook
  sys.modules['__main__'].__dict__.clear()              # nothing of the runner for the program to rebind
  req = json.loads(sys.stdin.read())
  nonce = req['nonce']
  result = {'net_isolated': False, 'layers': []}
  try:
    layers = setup(req)
  except BaseException as e:
    result['error'] = f'the sandbox could not be set up ({type(e).__name__}: {e}); the program did not run'
    write(1, ('\n' + nonce + dumps(result) + '\n').encode())
    exit(0)
  result['layers'] = layers
  result['net_isolated'] = 'network namespace' in layers
  # ctypes can write any memory, the audit hook's included, so the hook holds only without it.
  # numpy and sympy import it; they keep working where the kernel layers hold on their own.
  allow_ctypes = 'pid namespace' in layers and any(l.startswith('landlock') for l in layers)
  if not allow_ctypes:
    for name in [m for m in sys.modules if m == 'ctypes' or m.startswith(('ctypes.', '_ctypes'))]:
      del sys.modules[name]                             # a fresh import is an audited event, refused
  if req['audit_hook']:
    sys.addaudithook(make_hook(allow_ctypes))
  function = req['function']
  code = req['code']
  del req
  captured = StringIO()
  sys.stdout = captured
  try:
    namespace = {'__name__': '__sandbox__'}
    exec(compile(code, '<completion>', 'exec'), namespace)
    fn = namespace.get(function) if function else None
    if fn is None and not function:
      zero_arg = [v for v in namespace.values() if callable(v) and getattr(v, '__code__', None) is not None
                  and v.__code__.co_argcount == 0 and not v.__code__.co_kwonlyargcount]
      fn = zero_arg[-1] if zero_arg else None
    if fn is not None:
      result['answer'] = str(fn())[:200]
    elif function:
      result['error'] = f'the program defines no function {function!r}'
    else:
      lines = [l.strip() for l in captured.getvalue().splitlines() if l.strip()]
      if lines:
        result['answer'] = lines[-1][:200]
      else:
        result['error'] = 'the program defines no zero-argument function and prints nothing'
  except BaseException as e:
    result['error'] = f'{type(e).__name__}: {str(e)[:200]}'
  clear(builtin_names)                                  # json needs the builtins the program may have rebound
  update(builtin_names, saved_builtins)
  write(1, ('\n' + nonce + dumps(result) + '\n').encode())
  exit(0)


_runner()
'''


class CodeResult(NamedTuple):
  answer: str | None      # str(return value) or last printed line; None on failure
  error: str | None       # why there is no answer (exception, time limit, ...)
  net_isolated: bool      # whether the child ran in its own network namespace
  layers: tuple[str, ...] = ()   # the kernel layers that were in force (see the module docstring)


def extract_code(completion: str) -> str | None:
  """The program in a completion: an <llm-code> block, a ```python fence, or the text from
  the first top-level `def` on; None if there is none."""
  for pattern in (_LLM_CODE_RE, _FENCED_RE):
    blocks = pattern.findall(completion)
    if blocks:
      return '\n'.join(blocks)
  m = _DEF_RE.search(completion)
  return completion[m.start():] if m else None


class CodeRunner:
  """Runs programs in isolated subprocesses; see the module docstring for the limits."""

  def __init__(self, timeout_s: float = 2.0, memory_mb: int = 512, function_name: str = '',
               max_workers: int | None = None):
    if timeout_s <= 0 or memory_mb < 64:
      raise ValueError(f'timeout_s={timeout_s} must be > 0 and memory_mb={memory_mb} >= 64 '
                       '(the interpreter itself needs ~30 MB).')
    self.timeout_s = float(timeout_s)
    self.memory_mb = int(memory_mb)
    self.function_name = function_name
    self.max_workers = max_workers or min(8, os.cpu_count() or 1)
    self._root = os.geteuid() == 0
    if self._root:
      self._id_range = _unprivileged_id_range()
      self._read_search = not all(_world_readable(p) for p in _interpreter_paths())
    # Tests switch the interpreter layer off to check that the kernel layers hold on their own.
    self._audit_hook = True

  def run(self, code: str) -> CodeResult:
    """Runs one program and returns its answer or the reason it has none."""
    nonce = secrets.token_hex(16)
    ids = None
    if self._root:
      first, count = self._id_range
      ids = (first + secrets.randbelow(count),) * 2
    request = json.dumps({
        'code': code, 'function': self.function_name, 'nonce': nonce, 'ids': ids,
        'read_search': self._root and self._read_search, 'audit_hook': self._audit_hook,
        'limits': {'cpu_s': int(self.timeout_s) + 1, 'memory_bytes': self.memory_mb * 2**20}}).encode()
    with tempfile.TemporaryDirectory(prefix='cfrl_code_') as cwd:
      if ids:
        os.chown(cwd, *ids)
        os.chmod(cwd, 0o700)
      proc = subprocess.Popen(
          [sys.executable, '-I', '-B', '-c', _RUNNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
          stderr=subprocess.DEVNULL, cwd=cwd, env=_CHILD_ENV,
          start_new_session=True)
      try:
        stdout, problem = _exchange(proc, request, self.timeout_s)
      finally:
        _kill_everything(proc, ids[0] if ids else None)
    if problem:
      return CodeResult(None, problem, False)
    text = stdout.decode('utf-8', errors='replace')
    marker = text.rfind(nonce)
    if marker < 0:
      return CodeResult(None, f'the program ended without a result (exit status {proc.returncode}; '
                        'out of memory or CPU time?)', False)
    result = json.loads(text[marker + len(nonce):].splitlines()[0])
    return CodeResult(result.get('answer'), result.get('error'), result['net_isolated'],
                      tuple(result['layers']))

  def answer(self, code: str) -> str | None:
    return self.run(code).answer

  def answers(self, codes: Sequence[str | None]) -> list[str | None]:
    """The answer of each program (None entries stay None), several subprocesses at a time."""
    todo = [i for i, c in enumerate(codes) if c is not None]
    out: list[str | None] = [None] * len(codes)
    with concurrent.futures.ThreadPoolExecutor(self.max_workers) as pool:
      for i, ans in zip(todo, pool.map(self.answer, [codes[i] for i in todo])):
        out[i] = ans
    return out


def _exchange(proc: subprocess.Popen, request: bytes, timeout_s: float) -> tuple[bytes, str | None]:
  """Sends the request, reads stdout until EOF and waits for the exit, all before the deadline
  and within _MAX_OUTPUT bytes. Returns (stdout, None) or (b'', why not). Leaves the child
  unreaped so that its pid, process group and session cannot be reused before the sweep."""
  deadline = time.monotonic() + timeout_s
  late = f'time limit of {timeout_s}s exceeded'
  try:
    proc.stdin.write(request)   # the runner reads its whole stdin before anything else
    proc.stdin.close()
  except OSError:
    pass
  chunks, size = [], 0
  with selectors.DefaultSelector() as sel:
    sel.register(proc.stdout, selectors.EVENT_READ)
    while True:
      left = deadline - time.monotonic()
      if left <= 0:
        return b'', late
      if not sel.select(left):
        continue
      data = os.read(proc.stdout.fileno(), 65536)
      if not data:
        break
      size += len(data)
      if size > _MAX_OUTPUT:
        return b'', f'the program wrote more than {_MAX_OUTPUT} bytes to its standard output'
      chunks.append(data)
  while True:
    if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
      return b''.join(chunks), None
    if time.monotonic() >= deadline:
      return b'', late
    time.sleep(0.002)


def _kill_everything(proc: subprocess.Popen, uid: int | None):
  """SIGKILLs the child and every process in its session or process group, below it, or (as
  root) running as its uid, until none is left; then reaps the child. A process that called
  setsid still matches by ancestry or uid; inside the pid namespace none can outlive its init."""
  try:
    proc.kill()
  except OSError:
    pass
  for _ in range(100):
    victims = _processes_of(proc.pid, uid)
    if not victims:
      break
    for pid in victims:
      try:
        os.kill(pid, signal.SIGKILL)
      except OSError:
        pass
    time.sleep(0.001)
  proc.wait()


def _processes_of(root_pid: int, uid: int | None) -> list[int]:
  """Live processes (not zombies) other than this one that belong to the sandbox of root_pid."""
  parent, found = {}, set()
  for name in os.listdir('/proc'):
    if not name.isdigit():
      continue
    pid = int(name)
    try:
      with open(f'/proc/{pid}/stat', 'rb') as f:
        fields = f.read().rsplit(b')', 1)[1].split()
      if uid is not None and pid != os.getpid():
        with open(f'/proc/{pid}/status', 'rb') as f:
          uids = next(l for l in f if l.startswith(b'Uid:')).split()[1:]
        if str(uid).encode() in uids and fields[0] not in (b'Z', b'X'):
          found.add(pid)
    except (OSError, IndexError, StopIteration):
      continue                                          # exited meanwhile
    if fields[0] in (b'Z', b'X'):
      continue
    ppid, pgrp, session = int(fields[1]), int(fields[2]), int(fields[3])
    parent[pid] = ppid
    if root_pid in (pgrp, session):
      found.add(pid)
  for pid in parent:
    seen, p = set(), parent[pid]
    while p in parent and p not in seen and p != root_pid:
      seen.add(p)
      p = parent[p]
    if p == root_pid:
      found.add(pid)
  found.discard(os.getpid())
  found.discard(root_pid)
  return sorted(found)


def _unprivileged_id_range() -> tuple[int, int]:
  """(first, count) of user and group ids, mapped into this namespace and held by no account,
  from which each run as root draws its own id."""
  ranges = []
  for path in ('/proc/self/uid_map', '/proc/self/gid_map'):
    try:
      with open(path) as f:
        ranges.append([tuple(int(x) for x in line.split()) for line in f if line.strip()])
    except OSError:
      ranges.append([(0, 0, 2**32 - 1)])                # no user namespaces: every id exists
  lo, hi = 2**30, 2**31                                 # far above distribution and container ids
  for table in ranges:
    inside = [(max(lo, start), min(hi, start + count)) for start, _, count in table]
    inside = [(a, b) for a, b in inside if b - a >= 2**16]
    if not inside:
      raise ValueError(
          'CodeRunner runs as root but this user namespace maps no unprivileged ids in '
          f'[{lo}, {hi}) ({path}), so the programs it runs could not drop root. Run the job as a '
          'non-root user, or map a wider id range into the container.')
    lo, hi = max(inside, key=lambda r: r[1] - r[0])
  return lo, hi - lo


def _interpreter_paths() -> list[str]:
  return [sys.executable, *(p for p in sys.path if p and os.path.isdir(p))]


def _world_readable(path: str) -> bool:
  """Whether a user without groups or capabilities can reach and read path."""
  path = os.path.realpath(path)
  try:
    if not os.stat(path).st_mode & stat.S_IROTH:
      return False
    while path != os.path.dirname(path):
      path = os.path.dirname(path)
      if not os.stat(path).st_mode & stat.S_IXOTH:
        return False
  except OSError:
    return False
  return True
