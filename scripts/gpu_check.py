"""The GPU check: every GPU-only measurement and parity check of the project in one command.

    scripts/gpu-check.sh OUT_DIR              # on one H100/H200 (JAX_PLATFORMS=cuda)
    scripts/gpu-check.sh --dry-run OUT_DIR    # the same stages at toy sizes on a CPU

Stages run in priority order, each in its own process (a crash or an out-of-memory in one
cannot take the others down, and its device memory is freed before the next), under one time
guard (``--budget-s``, default 480 s = 8 minutes): a stage starts only if at least its minimum
time is left and is stopped when the budget runs out (recorded as ``timeout``, keeping whatever
JSON it had written); the stages after the budget are recorded as ``skipped``. A failing stage is
recorded and the next one still runs. Each stage writes ``OUT_DIR/<stage>.json`` as it finishes
(stage, status, seconds, device, jax, command, return code, the stage's own result JSON, log
tail); ``OUT_DIR/summary.json`` lists them all; logs go to ``OUT_DIR/logs/``.

Without ``--dry-run`` the backend must be a GPU (checked in a probe process before any stage).
Nothing is installed: ``PYTHONPATH`` is the checkout and every stage is ``python3`` (the server's
fastapi/uvicorn/pydantic are not needed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable or "python3"
STATUSES = ("pass", "fail", "error", "timeout", "skipped")


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage: its command on a GPU and at toy size (``{cache}``: this run's scratch directory
  for compilation caches, outside OUT_DIR; ``--out RESULT.json`` is appended), the most seconds
  it may run, and the least it needs."""

  name: str
  gpu: tuple
  dry: tuple
  cap_s: float
  min_s: float
  needs: str | None = None  # a stage that must have passed first
  flag: str | None = None   # a flag the command must offer (its --help), else skipped


E2E = ("-m", "dllm_jax.bench.e2e")
E2E_8B = ("--config", "llada-8b", "--layers", "32", "--batch", "32", "--block-length", "32",
          "--gen-length", "64", "--keep-ratio", "0.5", "--compile-cache", "{cache}/e2e")
E2E_TOY = ("--config", "bench-small", "--layers", "1", "--hidden-size", "64", "--batch", "2",
           "--block-length", "4", "--gen-length", "8", "--keep-ratio", "0.5", "--repeats", "2",
           "--compile-cache", "{cache}/e2e")
# What `serve --warmup full` compiles: the server's default EngineConfig at LLaDA-8B dims.
WARM_8B = ("scripts/gpu_warmup.py", "--config", "llada-8b", "--layers", "32",
           "--cache-dir", "{cache}/warmup")
WARM_TOY = ("scripts/gpu_warmup.py", "--config", "bench-small", "--layers", "1",
            "--hidden-size", "64", "--cache-dir", "{cache}/warmup", "--max-model-len", "32",
            "--token-budget", "32", "--max-running", "2", "--max-refresh-rows", "1",
            "--max-reuse-rows", "1", "--max-block-length", "8")

STAGES = (
    Stage("kernels", ("scripts/gpu_kernel_cases.py", "--impl", "pallas", "--size", "gpu"),
          ("scripts/gpu_kernel_cases.py", "--impl", "interpret", "--size", "toy"), 120, 20),
    Stage("gqa_mosaic", ("scripts/gqa_kernel_check.py",),
          ("scripts/gqa_kernel_check.py", "--dry-run"), 120, 30),
    Stage("refresh_attention", ("scripts/gpu_refresh_attention.py", "--size", "gpu"),
          ("scripts/gpu_refresh_attention.py", "--size", "toy"), 90, 15),
    Stage("bench_attention", ("-m", "dllm_jax.cli", "bench", "attention", "--cases", "llada-8b",
                              "dream-7b", "--impl", "pallas"),
          ("-m", "dllm_jax.cli", "bench", "attention", "--cases", "cpu-small", "--repeats", "1"),
          120, 20),
    Stage("bench_logits", ("-m", "dllm_jax.cli", "bench", "logits"),
          ("-m", "dllm_jax.cli", "bench", "logits", "--skip-8b", "--rows", "64", "--d", "64",
           "--vocab", "1024", "--repeats", "1"), 150, 20),
    Stage("e2e_n256", E2E + E2E_8B + ("--prompt-len", "192", "--modes", "dense,dual,sparse",
                                      "--memory-budget-gb", "30"),
          E2E + E2E_TOY + ("--prompt-len", "24", "--modes", "dense,dual,sparse"), 600, 90),
    Stage("e2e_n2048", E2E + E2E_8B + ("--prompt-len", "1984", "--modes", "dual,sparse",
                                       "--max-refresh-rows", "8", "--memory-budget-gb", "64"),
          E2E + E2E_TOY + ("--prompt-len", "56", "--modes", "dual,sparse",
                           "--max-refresh-rows", "2"), 600, 90),
    Stage("pool_sweep", E2E + E2E_8B + ("--prompt-len", "192", "--modes", "none",
                                        "--sweep-mode", "dual", "--pool-sweep", "0.135,0.15,0.3",
                                        "--no-single-phase"),
          E2E + E2E_TOY + ("--prompt-len", "24", "--modes", "none", "--sweep-mode", "dual",
                           "--pool-sweep", "0.5,1", "--device-memory-gb", "0.05"), 600, 90),
    Stage("logits_calibrate", ("-m", "dllm_jax.cli", "bench", "logits", "--calibrate"),
          ("-m", "dllm_jax.cli", "bench", "logits", "--calibrate", "--calibrate-rows", "16",
           "--repeats", "1"), 150, 20, flag="--calibrate"),
    Stage("warmup_cold", WARM_8B, WARM_TOY, 420, 60),
    Stage("warmup_cached", WARM_8B, WARM_TOY, 300, 30, needs="warmup_cold"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)

PROBE = ("import json, jax; d = jax.devices()[0]; print(json.dumps(dict(device=d.device_kind, "
         "backend=jax.default_backend(), jax=jax.__version__, device_count=jax.device_count(), "
         "platform=d.platform)))")


def _env(dry: bool, cache: str) -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  env["JAX_PLATFORMS"] = "cpu" if dry else "cuda"
  # Stages pick their compile caches (flags); the CLI's default one goes to the scratch dir.
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env["DLLM_JAX_CACHE_DIR"] = os.path.join(cache, "cli")
  env.setdefault("PYTHONUNBUFFERED", "1")
  return env


def _tail(path: str, n: int = 4000) -> str:
  try:
    with open(path, "rb") as fh:
      fh.seek(0, os.SEEK_END)
      fh.seek(max(0, fh.tell() - n))
      return fh.read().decode("utf-8", "replace")
  except OSError:
    return ""


def _run(argv: list, log: str, timeout: float, env: dict) -> tuple[int | None, float]:
  """Run ``argv`` in its own process group; (return code or None on timeout, seconds)."""
  t = time.perf_counter()
  with open(log, "w") as fh:
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
      rc = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGTERM)
      try:
        proc.wait(timeout=15)
      except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
      rc = None
  return rc, time.perf_counter() - t


def _offers(cmd: list, flag: str, env: dict) -> bool:
  """Whether ``cmd --help`` lists ``flag`` (a flag another change may not have landed yet)."""
  base = [a for a in cmd if a != flag]
  try:
    out = subprocess.run(base + ["--help"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120).stdout
  except (OSError, subprocess.TimeoutExpired):
    return False
  return flag in out


def _write(path: str, obj: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as fh:
    json.dump(obj, fh, indent=1)
  os.replace(tmp, path)


def run_stage(stage: Stage, args, env: dict, info: dict, deadline: float, done: dict,
              cache: str) -> dict:
  """Run one stage (or skip it) and return its record; ``deadline``: perf_counter() time by
  which everything must have ended."""
  out = args.out_dir
  raw = os.path.join(out, "raw", f"{stage.name}.json")
  log = os.path.join(out, "logs", f"{stage.name}.log")
  cmd = [PY] + [a.replace("{cache}", cache) for a in (stage.dry if args.dry_run else stage.gpu)]
  cmd += ["--out", raw]
  rec = dict(stage=stage.name, **info, dry_run=args.dry_run, command=cmd, seconds=0.0,
             returncode=None, result=None, log=log)
  if stage.needs and done.get(stage.needs) != "pass":
    return dict(rec, status="skipped", reason=f"needs {stage.needs} to pass first")
  left = deadline - time.perf_counter()
  if left < stage.min_s:
    return dict(rec, status="skipped",
                reason=f"time budget spent ({left:.0f} s left, needs {stage.min_s:.0f})")
  if stage.flag and not _offers(cmd[:cmd.index("--out")], stage.flag, env):
    return dict(rec, status="skipped", reason=f"this checkout has no {stage.flag}")
  if stage.name == "warmup_cold":  # a cold start means an empty cache
    shutil.rmtree(os.path.join(cache, "warmup"), ignore_errors=True)
  if os.path.exists(raw):
    os.remove(raw)
  timeout = min(stage.cap_s, deadline - time.perf_counter())
  rc, secs = _run(cmd, log, timeout, env)
  try:
    with open(raw) as fh:
      result = json.load(fh)
  except (OSError, ValueError):
    result = None
  if rc is None:
    status, reason = "timeout", f"stopped after {timeout:.0f} s"
  elif rc == 0 and result is not None:
    status, reason = "pass", None
  elif rc == 1 and result is not None:
    status, reason = "fail", "a check or a measurement failed (see result)"
  else:
    status, reason = "error", f"exit status {rc}" + ("" if result is not None else ", no result")
  rec.update(status=status, reason=reason, seconds=secs, returncode=rc, result=result,
             log_tail=_tail(log))
  return rec


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU, no GPU needed")
  p.add_argument("--budget-s", type=float, default=480.0, help="overall time guard (480 s)")
  p.add_argument("--stages", default=",".join(STAGE_NAMES),
                 help=f"comma-separated subset, in this order: {','.join(STAGE_NAMES)}")
  p.add_argument("out_dir")
  args = p.parse_args(argv)
  wanted = [s for s in args.stages.split(",") if s]
  bad = [s for s in wanted if s not in STAGE_NAMES]
  if bad:
    p.error(f"--stages: unknown {bad}; choose from {STAGE_NAMES}")
  args.out_dir = os.path.abspath(args.out_dir)
  for sub in ("", "raw", "logs"):
    os.makedirs(os.path.join(args.out_dir, sub), exist_ok=True)
  t0 = time.perf_counter()
  cache = tempfile.mkdtemp(prefix="dllm-gpu-check-")  # compile caches: big, never in OUT_DIR
  try:
    return _main(args, wanted, cache, t0)
  finally:
    shutil.rmtree(cache, ignore_errors=True)


def _main(args, wanted: list, cache: str, t0: float) -> int:
  env = _env(args.dry_run, cache)
  summary = dict(dry_run=args.dry_run, budget_s=args.budget_s, stages=[])
  info, err = None, "timed out after 300 s"
  try:
    probe = subprocess.run([PY, "-c", PROBE], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    err = probe.stderr
    info = json.loads(probe.stdout.strip().splitlines()[-1])
  except (ValueError, IndexError, subprocess.TimeoutExpired):
    pass
  if info is None or (not args.dry_run and info["backend"] != "gpu"):
    why = (f"the backend is {info['backend']!r}, not a GPU" if info else
           f"jax did not start: {err[-2000:]}")
    _write(os.path.join(args.out_dir, "summary.json"),
           dict(summary, passed=False, error=f"assertion failed: {why}", device_info=info))
    print(f"gpu-check: {why}", file=sys.stderr)
    return 2
  summary.update(device=info["device"], jax=info["jax"], backend=info["backend"],
                 device_count=info["device_count"])
  base = dict(device=info["device"], jax=info["jax"], backend=info["backend"])
  done: dict[str, str] = {}
  for stage in STAGES:
    if stage.name not in wanted:
      continue
    rec = run_stage(stage, args, env, base, t0 + args.budget_s, done, cache)
    done[stage.name] = rec["status"]
    _write(os.path.join(args.out_dir, f"{stage.name}.json"), rec)
    summary["stages"].append(dict(stage=stage.name, status=rec["status"],
                                  seconds=round(rec["seconds"], 2), reason=rec.get("reason")))
    print(f"[{time.perf_counter() - t0:6.1f} s] {stage.name:<18} {rec['status']:<8} "
          f"{rec['seconds']:6.1f} s {rec.get('reason') or ''}", flush=True)
  bad = [s for s in summary["stages"] if s["status"] in ("fail", "error", "timeout")]
  summary.update(elapsed_s=time.perf_counter() - t0, passed=not bad,
                 counts={k: sum(s["status"] == k for s in summary["stages"]) for k in STATUSES})
  _write(os.path.join(args.out_dir, "summary.json"), summary)
  print(f"gpu-check: {summary['counts']} -> {os.path.join(args.out_dir, 'summary.json')}")
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
