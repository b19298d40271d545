"""Tensor parallelism over a ``jax.sharding.Mesh`` axis ``tp`` (Megatron layout, explicit).

The engine's step runs under ``jax.shard_map`` on a 1-D mesh (one device by default), so every
device executes the same local program on its shard and the collectives are written out:

  embedding   vocab-parallel rows; each device looks up its own id range, then psum
  q, k, v     column-parallel by head (bias sharded with its columns)
  o_proj      row-parallel, then psum
  MLP         gate / up column-parallel, down row-parallel, then psum
  LM head     vocab-parallel columns; each device keeps per-row online statistics of its vocab
              shard (max, sum-exp, noisy argmax, top-2, entropy accumulator), and only those
              [rows]-sized statistics cross devices (all_gather + merge): the [rows x V] logits
              are never gathered
  KV pool     one page range per device: device d stores the pages of its own KV heads

Fewer KV heads than devices (e.g. Dream's 4 over 8): the k/v projections are replicated so each
device holds a copy of the KV head its query heads read (``expand_kv_heads``); its pages are
then stored on that device too. Query heads must divide by the device count.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dllm_jax.config import ModelConfig

AXIS = "tp"


def make_mesh(tp: int = 1, devices=None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  if tp < 1 or tp > len(devices):
    raise ValueError(f"tp={tp}: need between 1 and {len(devices)} devices "
                     f"(have {len(devices)}: {devices[0].platform})")
  return Mesh(np.asarray(devices[:tp]), (AXIS,))


@dataclasses.dataclass(frozen=True)
class TPLayout:
  """How a model's heads and vocabulary split over ``tp`` devices."""

  tp: int
  num_heads: int
  num_kv_heads: int      # stored KV heads (after replication when Hkv < tp)
  kv_replication: int    # copies of each original KV head
  vocab_size: int        # padded to a multiple of tp
  real_vocab: int

  @property
  def heads_per_device(self) -> int:
    return self.num_heads // self.tp

  @property
  def kv_heads_per_device(self) -> int:
    return self.num_kv_heads // self.tp

  @property
  def vocab_per_device(self) -> int:
    return self.vocab_size // self.tp


def layout_for(cfg: ModelConfig, tp: int) -> TPLayout:
  if cfg.num_heads % tp:
    raise ValueError(f"tp={tp} does not divide the {cfg.num_heads} query heads")
  rep = 1
  if cfg.num_kv_heads < tp:
    if tp % cfg.num_kv_heads:
      raise ValueError(f"tp={tp} is not a multiple of the {cfg.num_kv_heads} KV heads")
    rep = tp // cfg.num_kv_heads
  elif cfg.num_kv_heads % tp:
    raise ValueError(f"tp={tp} does not divide the {cfg.num_kv_heads} KV heads")
  v = -(-cfg.vocab_size // tp) * tp
  return TPLayout(tp, cfg.num_heads, cfg.num_kv_heads * rep, rep, v, cfg.vocab_size)


def expand_kv_heads(pure: dict, cfg: ModelConfig, rep: int) -> dict:
  """Replicate each KV head's k/v projection columns ``rep`` times (head order kept), so a
  column-parallel split gives every device the KV head its query heads use."""
  if rep == 1:
    return pure
  d = cfg.head_dim

  def expand(x, axis):
    shape = x.shape
    heads = shape[axis] // d
    x = x.reshape(shape[:axis] + (heads, d) + shape[axis + 1:])
    x = jnp.repeat(x, rep, axis=axis)
    return x.reshape(shape[:axis] + (heads * rep * d,) + shape[axis + 1:])

  out = jax.tree.map(lambda x: x, pure)
  attn = out["layers"]["attn"]  # stacked [L, ...]: the head axis is the last one
  for name in ("k_proj", "v_proj"):
    proj = attn[name]
    proj["kernel"] = expand(proj["kernel"], 2)
    if proj.get("bias") is not None:
      proj["bias"] = expand(proj["bias"], 1)
  return out


def pad_vocab(pure: dict, vocab: int) -> dict:
  """Zero-pad embedding rows and LM-head columns to ``vocab`` (padded ids are masked in decode)."""
  out = jax.tree.map(lambda x: x, pure)
  v = out["embed"].shape[0]
  if vocab > v:
    out["embed"] = jnp.pad(out["embed"], ((0, vocab - v), (0, 0)))
    out["lm_head"]["kernel"] = jnp.pad(out["lm_head"]["kernel"], ((0, 0), (0, vocab - v)))
  return out


def param_specs(pure: dict) -> dict:
  """PartitionSpec per parameter (same tree as the pure dict). Layer parameters are stacked
  [L, ...]: their specs get a leading None (the layer axis is never split)."""
  col = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
  row = {"o_proj", "down_proj"}

  def spec(path, x):
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    name = next((k for k in reversed(keys) if k in col | row | {"lm_head", "embed"}), None)
    leaf = keys[-1]
    if name == "embed":
      return P(AXIS, None)
    if name == "lm_head":
      return P(None, AXIS)
    lead = (None,) if keys[0] == "layers" else ()
    if name in col:
      return P(*lead, None, AXIS) if leaf == "kernel" else P(*lead, AXIS)
    if name in row:
      return P(*lead, AXIS, None)
    return P()  # norms: replicated

  return jax.tree_util.tree_map_with_path(spec, pure)


def put(x, mesh: Mesh, spec: P):
  """Place a host value (identical on every process) with ``spec`` on the mesh. Single process:
  device_put; multi-process (jax.distributed): each process fills its addressable shards."""
  sharding = NamedSharding(mesh, spec)
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def to_host(x) -> np.ndarray:
  """A replicated result as numpy (multi-process: this process's copy)."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  return np.asarray(x.addressable_shards[0].data)


def shard_params(pure: dict, mesh: Mesh) -> dict:
  specs = param_specs(pure)
  return jax.tree.map(lambda x, s: put(x, mesh, s), pure, specs)
