"""Multi-host wiring: one process per host, ``jax.distributed`` for the global device set.

Every process runs the same program (SPMD, multi-controller): the same engine configuration, the
same requests in the same order (the host logic is deterministic), and the same jitted step over
a mesh that spans every process's devices. Inputs are placed as global arrays
(``parallel.put``) and each process reads its own replica of the step's small results.

    from dllm_jax import distributed
    distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=RANK)
    llm = LLM(model, engine_config=EngineConfig(tp=jax.device_count()))

On CPU (tests) collectives between processes go through gloo.
"""

from __future__ import annotations

import jax


def initialize(coordinator_address: str, num_processes: int, process_id: int,
               local_device_ids=None) -> None:
  """Join the process group (idempotent per process). Call before any other JAX work."""
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(f"process_id {process_id} outside [0, {num_processes})")
  if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=local_device_ids)


def describe() -> dict:
  return dict(process_index=jax.process_index(), process_count=jax.process_count(),
              local_devices=jax.local_device_count(), global_devices=jax.device_count())
