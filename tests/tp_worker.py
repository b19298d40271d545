"""Run in a subprocess with simulated CPU devices: decode with tp = 1, 2, 4 and report JSON.

argv: family (llada | dream). Prints one JSON object on the last line.
"""

import json
import os
import re
import sys
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

from dllm_jax.cache.sparse_state import SparseConfig  # noqa: E402
from dllm_jax.config import EngineConfig, ModelConfig, SamplingParams  # noqa: E402
from dllm_jax.engine.batch import build_step  # noqa: E402
from dllm_jax.engine.engine import LLM  # noqa: E402
from dllm_jax.model.transformer import init_model  # noqa: E402

CONFIGS = {
    # vocab 66: not a multiple of 4, so tp = 4 pads it
    "llada": dict(model_type="llada", d_model=32, n_layers=2, n_heads=4, mlp_hidden_size=48,
                  vocab_size=66, max_sequence_length=64, rope_theta=5e5, rms_norm_eps=1e-5,
                  mask_token_id=63, eos_token_id=62),
    # Dream-like GQA: 4 KV heads over up to 4 devices. Vocab sizes differ from every other
    # dimension so a vocab-sized collective would be recognisable in the HLO.
    "dream": dict(model_type="Dream", hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=4, intermediate_size=48, vocab_size=72,
                  max_position_embeddings=64, rope_theta=1e6, rms_norm_eps=1e-6,
                  mask_token_id=63, eos_token_id=62),
}


def collectives(text: str) -> dict:
  """Ops and result shapes of every all-reduce / all-gather in optimised HLO."""
  out = {}
  for kind in ("all-reduce", "all-gather"):
    shapes = re.findall(rf"= ([^ ]+) {kind}(?:-start)?\(", text)
    out[kind] = shapes
  return out


def main(family: str) -> None:
  cfg = ModelConfig.from_dict(CONFIGS[family])
  model = init_model(cfg, seed=0)
  prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
  sps = [SamplingParams(gen_length=8, block_length=4, stop_on_eos=False),
         SamplingParams(gen_length=8, block_length=4, temperature=0.8, seed=5, stop_on_eos=False)]
  result = {"tokens": {}, "pages_back": {}, "shards": {}, "hlo": {}}
  for tp in (1, 2, 4):
    for sparse in (None, SparseConfig(keep_ratio=0.5)):
      llm = LLM(model, engine_config=EngineConfig(logits="rows", page_size=16, tp=tp,
                                                  max_running=2, max_model_len=64))
      key = f"{tp}-{'sparse' if sparse else 'dense'}"
      t0 = time.perf_counter()
      outs = llm.generate(prompts, sps, sparse=sparse)
      print(f"{key}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
      core = llm.core
      result["tokens"][key] = [o.token_ids for o in outs]
      result["pages_back"][key] = core.pages.num_free == core.pages.capacity
      if sparse is not None:
        result["shards"][str(tp)] = {
            "pool": [list(s.data.shape) for s in core.cache.k.addressable_shards],
            "table": [list(s.data.shape) for s in core.cache.page_table.addressable_shards],
            "kv_heads": cfg.num_kv_heads, "layout_kv_heads": core.runner.layout.num_kv_heads,
        }
      if tp == 2 and sparse is None:
        reqs = []
        for i, p in enumerate(prompts):
          rid = llm.add_request(p, sps[i])
          reqs.append(rid)
        core._drain()
        plan = core.scheduler.schedule()
        shapes = core.shapes_for(plan.refresh, plan.reuse)
        inp, _ = build_step(plan.refresh, plan.reuse, cfg, core.layout(shapes), sparse_on=True,
                            max_slots=core.pool_cfg.max_slots, reserved_width=core.reserved_width)
        key = core.step_key(shapes)
        text = core.runner.compiled_text(key, key[1], core.cache, inp)
        result["hlo"] = collectives(text)
        result["hlo"]["vocab"] = core.runner.layout.vocab_size
        result["hlo"]["vocab_local"] = core.runner.layout.vocab_per_device
        result["hlo"]["rows"] = key[1].decode.chunk  # the decode head's rows per iteration
  print(json.dumps(result))


if __name__ == "__main__":
  main(sys.argv[1])
