"""One Flax NNX bidirectional transformer for LLaDA (MHA, no bias) and Dream (GQA, q/k/v bias).

Forward contract (docs/architecture.md): the model takes a ``StepBatch`` and returns final
hidden states, never logits. The LM head is its own parameter, applied by :func:`lm_head_logits`
(or by the budgeted logit module on candidate rows only). Dream's shifted prediction is applied
by the caller with :func:`shift_for_prediction`.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from dllm_jax.config import ModelConfig
from dllm_jax.model.layers import Linear, RMSNorm, rope


@flax.struct.dataclass
class RefreshPart:
  """Full-canvas rows, right-padded.

  tokens, positions: [Br, N] int32; lengths: [Br] int32 (keys at index >= length are masked).
  """

  tokens: jax.Array
  positions: jax.Array
  lengths: jax.Array


@flax.struct.dataclass
class StepBatch:
  """What one fused step feeds the model. The Reuse part (sparse cache) is added by the sparse path."""

  refresh: RefreshPart
  reuse: Any = None


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
    d, hd = cfg.hidden_size, cfg.head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
    self.theta = cfg.rope_theta
    self.q_proj = Linear(d, cfg.num_heads * hd, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
    self.k_proj = Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
    self.v_proj = Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
    self.o_proj = Linear(cfg.num_heads * hd, d, bias=False, dtype=dtype, rngs=rngs)

  def qkv(self, h: jax.Array, positions: jax.Array):
    """Post-RoPE q [..., T, Hq, D], k and v [..., T, Hkv, D] from h [..., T, d].

    Head counts come from the projections' shapes, so a tensor-parallel shard (a slice of the
    heads) runs the same code.
    """
    lead = h.shape[:-1]
    q = self.q_proj(h).reshape(*lead, -1, self.head_dim)
    k = self.k_proj(h).reshape(*lead, -1, self.head_dim)
    v = self.v_proj(h).reshape(*lead, -1, self.head_dim)
    return rope(q, positions, self.theta), rope(k, positions, self.theta), v



class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)). In LLaDA naming gate = ff_proj, down = ff_out."""

  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = Linear(d, f, bias=False, dtype=dtype, rngs=rngs)
    self.up_proj = Linear(d, f, bias=False, dtype=dtype, rngs=rngs)
    self.down_proj = Linear(f, d, bias=False, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  """One transformer layer's parameters. The model holds ONE Block whose parameters are stacked
  over layers ([L, ...]); the forward runs it under ``lax.scan`` (dllm_jax/model/fused.py)."""

  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
    self.attn = Attention(cfg, dtype=dtype, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
    self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)


def stack_blocks(blocks: list[Block]) -> Block:
  """One Block whose parameters are the given blocks' stacked on a leading layer axis."""
  graphdef, _ = nnx.split(blocks[0])
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in blocks])
  return nnx.merge(graphdef, stacked)


class Transformer(nnx.Module):
  """Bidirectional LLaDA / Dream transformer. ``param_dtype``: float32 on CPU, bfloat16 on GPU.

  ``layers`` is one :class:`Block` with every parameter stacked over the L layers (so each step
  executable holds one layer body, whatever the depth); :meth:`layer` gives one layer's view.
  """

  def __init__(self, cfg: ModelConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Param(
        jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), param_dtype))
    # Built one by one, then stacked: the same random draws as a per-layer list.
    self.layers = stack_blocks([Block(cfg, dtype=param_dtype, rngs=rngs)
                                for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=param_dtype)
    self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=param_dtype,
                          rngs=rngs)

  @property
  def dtype(self):
    return self.embed[...].dtype

  def layer(self, i: int) -> Block:
    """Layer i's parameters as a plain Block (a copy; for inspection, tests and notebooks)."""
    if not 0 <= i < self.cfg.num_layers:
      raise IndexError(f"layer {i} of a {self.cfg.num_layers}-layer model")
    graphdef, state = nnx.split(self.layers)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x[i], state))

  def refresh(self, tokens: jax.Array, positions: jax.Array, lengths: jax.Array) -> jax.Array:
    """Full forward over right-padded rows: tokens/positions [B, N], lengths [B] -> [B, N, d].

    The same layer body as the engine's fused step (dllm_jax/model/fused.py)."""
    from dllm_jax.model.fused import step_forward
    hidden, _, _ = step_forward(self, RefreshPart(tokens, positions, lengths), None)
    return hidden

  def __call__(self, batch: StepBatch) -> jax.Array:
    if batch.reuse is not None:
      raise NotImplementedError("the Reuse part is served by the sparse runner")
    r = batch.refresh
    return self.refresh(r.tokens, r.positions, r.lengths)


def lm_head_logits(model: Transformer, hidden: jax.Array) -> jax.Array:
  """Full logits [..., V] in float32. Only for tests and the `full` baseline variant."""
  return jnp.dot(hidden, model.lm_head.kernel[...], preferred_element_type=jnp.float32)


def shift_for_prediction(hidden: jax.Array) -> jax.Array:
  """Dream's shift over the token axis (-2): row j takes hidden row j-1; row 0 keeps its own.

  Matches Dream's ``cat([logits[:, :1], logits[:, :-1]])`` applied to hidden states.
  """
  return jnp.concatenate([hidden[..., :1, :], hidden[..., :-1, :]], axis=-2)


def init_model(cfg: ModelConfig, *, param_dtype=jnp.float32, seed: int = 0) -> Transformer:
  return Transformer(cfg, param_dtype=param_dtype, rngs=nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig, *, param_dtype=jnp.float32) -> Transformer:
  """Shapes only (no memory): for parameter counts and for loading into."""
  return nnx.eval_shape(lambda: Transformer(cfg, param_dtype=param_dtype, rngs=nnx.Rngs(0)))


def count_params(model: Transformer) -> int:
  state = nnx.state(model, nnx.Param)
  return int(sum(x.size for x in jax.tree.leaves(state)))
