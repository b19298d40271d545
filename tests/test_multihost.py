"""Two local processes joined by jax.distributed (loopback coordinator), 2 simulated CPU devices
each: tensor parallelism over the 4 global devices gives the single-process tokens."""

import json
import os
import socket
import subprocess
import sys

HERE = os.path.dirname(__file__)
WORKER = os.path.join(HERE, "multihost_worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(args, timeout=900):
  return subprocess.Popen([sys.executable, WORKER, *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=os.path.dirname(HERE))


def test_two_processes_tp4_match_single_process():
  single = _run([0, 0, 1])
  out, err = single.communicate(timeout=900)
  assert single.returncode == 0, err[-3000:]
  ref = json.loads(out.strip().splitlines()[-1])
  port = _free_port()
  procs = [_run([port, pid, 4]) for pid in (0, 1)]
  results = []
  for p in procs:
    out, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]
    results.append(json.loads(out.strip().splitlines()[-1]))
  for pid, r in enumerate(results):
    assert r["process_count"] == 2 and r["global_devices"] == 4 and r["process_index"] == pid
    assert r["tokens"] == ref["tokens"]
