"""One of two processes of the multi-host test: argv = port, process id. Prints JSON tokens."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

from dllm_jax import distributed  # noqa: E402


def main(port: int, pid: int, tp: int) -> None:
  if tp > 2:
    distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
  from dllm_jax.cache.sparse_state import SparseConfig
  from dllm_jax.config import EngineConfig, ModelConfig, SamplingParams
  from dllm_jax.engine.engine import LLM
  from dllm_jax.model.transformer import init_model

  cfg = ModelConfig.from_dict(dict(
      model_type="llada", d_model=32, n_layers=2, n_heads=4, mlp_hidden_size=48, vocab_size=66,
      max_sequence_length=64, rope_theta=5e5, rms_norm_eps=1e-5, mask_token_id=63,
      eos_token_id=62))
  llm = LLM(init_model(cfg, seed=0), engine_config=EngineConfig(
      logits="rows", page_size=16, tp=tp, max_running=2, max_model_len=64))
  sps = [SamplingParams(gen_length=8, block_length=4, stop_on_eos=False),
         SamplingParams(gen_length=8, block_length=4, temperature=0.8, seed=5, stop_on_eos=False)]
  outs = llm.generate([[1, 2, 3], [4, 5, 6, 7, 8, 9]], sps, sparse=[None, SparseConfig()])
  print(json.dumps(dict(distributed.describe(), tokens=[o.token_ids for o in outs])))


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
