"""HF-layout safetensors <-> model parameters, in the real LLaDA and Dream tensor names.

Load: single ``model.safetensors`` or shards listed in ``model.safetensors.index.json``; tensors are
read lazily as numpy (``safe_open(framework="np")``, never onto an accelerator twice), checked
against the expected name set and shapes, transposed from torch ``[out, in]`` to our ``[in, out]``
kernels, cast to the parameter dtype and stacked over layers (the model keeps every layer
parameter as one ``[L, ...]`` array, run under ``lax.scan``). Export unstacks and writes exactly
the same names, sharded by a max shard size with an index, so ``load(export(p)) == p``.
"""

from __future__ import annotations

import json
import os
import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy before safetensors reads it)
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from dllm_jax.config import ModelConfig
from dllm_jax.model.transformer import Transformer, abstract_model

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# (HF name pattern, our path, transpose). "{i}" is the layer index: layer i of our stacked
# [L, ...] parameter at that path.
_LLADA = [
    ("model.transformer.wte.weight", "embed", False),
    ("model.transformer.blocks.{i}.attn_norm.weight", "layers.attn_norm.weight", False),
    ("model.transformer.blocks.{i}.q_proj.weight", "layers.attn.q_proj.kernel", True),
    ("model.transformer.blocks.{i}.k_proj.weight", "layers.attn.k_proj.kernel", True),
    ("model.transformer.blocks.{i}.v_proj.weight", "layers.attn.v_proj.kernel", True),
    ("model.transformer.blocks.{i}.attn_out.weight", "layers.attn.o_proj.kernel", True),
    ("model.transformer.blocks.{i}.ff_norm.weight", "layers.mlp_norm.weight", False),
    ("model.transformer.blocks.{i}.ff_proj.weight", "layers.mlp.gate_proj.kernel", True),
    ("model.transformer.blocks.{i}.up_proj.weight", "layers.mlp.up_proj.kernel", True),
    ("model.transformer.blocks.{i}.ff_out.weight", "layers.mlp.down_proj.kernel", True),
    ("model.transformer.ln_f.weight", "final_norm.weight", False),
    ("model.transformer.ff_out.weight", "lm_head.kernel", True),
]
_DREAM = [
    ("model.embed_tokens.weight", "embed", False),
    ("model.layers.{i}.input_layernorm.weight", "layers.attn_norm.weight", False),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.attn.q_proj.kernel", True),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers.attn.q_proj.bias", False),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.attn.k_proj.kernel", True),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers.attn.k_proj.bias", False),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.attn.v_proj.kernel", True),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers.attn.v_proj.bias", False),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.attn.o_proj.kernel", True),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.mlp_norm.weight", False),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.mlp.gate_proj.kernel", True),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.mlp.up_proj.kernel", True),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.mlp.down_proj.kernel", True),
    ("model.norm.weight", "final_norm.weight", False),
    ("lm_head.weight", "lm_head.kernel", True),
]


class CheckpointError(ValueError):
  """A checkpoint does not match the model: missing, unexpected or mis-shaped tensors."""


def name_map(cfg: ModelConfig) -> dict[str, tuple[str, int | None, bool]]:
  """HF tensor name -> (our dotted param path, layer index or None, transpose?) for every tensor
  of ``cfg``. A layer tensor is slice [i] of our stacked [L, ...] parameter."""
  table = _LLADA if cfg.family == "llada" else _DREAM
  out = {}
  for hf, ours, t in table:
    if "{i}" in hf:
      for i in range(cfg.num_layers):
        out[hf.format(i=i)] = (ours, i, t)
    else:
      out[hf] = (ours, None, t)
  return out


def _flat_params(model: Transformer) -> dict[str, jax.Array]:
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  flat = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(pure):
    flat[".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = leaf
  return flat


def _nest(flat: dict[str, np.ndarray]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = v
  return out


def _files_of(path: str) -> list[str]:
  index = os.path.join(path, INDEX_FILE)
  single = os.path.join(path, SINGLE_FILE)
  if os.path.isfile(index):
    with open(index) as fh:
      weight_map = json.load(fh).get("weight_map")
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index}: no 'weight_map' object")
    files = sorted(set(weight_map.values()))
    for f in files:
      if not os.path.isfile(os.path.join(path, f)):
        raise CheckpointError(f"{index} lists shard {f!r}, which does not exist")
    return [os.path.join(path, f) for f in files]
  if os.path.isfile(single):
    return [single]
  raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")


def load_params(path: str, cfg: ModelConfig, *, param_dtype=jnp.float32) -> dict:
  """Read a checkpoint into a nested pure dict matching ``nnx.to_pure_dict`` of the model."""
  expected = name_map(cfg)
  abstract = _flat_params(abstract_model(cfg, param_dtype=param_dtype))
  flat: dict[str, np.ndarray] = {}
  seen = set()
  files = _files_of(path)
  for f in files:
    try:
      fh = safe_open(f, framework="np")
    except Exception as e:
      raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
    with fh:
      for name in fh.keys():
        if name not in expected:
          raise CheckpointError(f"unexpected tensor {name!r} in {os.path.basename(f)} "
                                f"(not part of a {cfg.family} model with {cfg.num_layers} layers)")
        if name in seen:
          raise CheckpointError(f"tensor {name!r} appears in more than one shard")
        seen.add(name)
        ours, layer, transpose = expected[name]
        full = tuple(abstract[ours].shape)
        want = full[1:] if layer is not None else full
        want_hf = want[::-1] if transpose else want
        got = tuple(fh.get_slice(name).get_shape())
        if got != want_hf:
          raise CheckpointError(f"tensor {name!r} has shape {list(got)}, expected {list(want_hf)}")
        try:
          arr = fh.get_tensor(name)
        except Exception as e:
          raise CheckpointError(f"tensor {name!r} could not be read ({e})") from None
        arr = (arr.T if transpose else arr).astype(np.dtype(param_dtype))
        if layer is None:
          flat[ours] = np.ascontiguousarray(arr)
        else:  # stack in place: one [L, ...] host buffer per parameter
          if ours not in flat:
            flat[ours] = np.empty(full, np.dtype(param_dtype))
          flat[ours][layer] = arr
  missing = sorted(set(expected) - seen)
  if missing:
    raise CheckpointError(f"missing tensor {missing[0]!r}" +
                          (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  return _nest(flat)


def load_model(path: str, *, param_dtype=None, cfg: ModelConfig | None = None) -> Transformer:
  """Build a model from an HF-layout directory (config.json + safetensors) or an orbax
  directory written by ``dllm-jax convert --to orbax`` (config.json + params/).

  ``param_dtype`` defaults to float32 on CPU and bfloat16 on an accelerator.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"model directory not found: {path}")
  cfg = cfg or ModelConfig.from_json(path)
  if param_dtype is None:
    param_dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  if os.path.isdir(os.path.join(path, "params")):  # an orbax directory (dllm-jax convert)
    from dllm_jax.model.checkpoint import restore_params
    return restore_params(path, cfg=cfg, param_dtype=param_dtype)
  pure = load_params(path, cfg, param_dtype=param_dtype)
  return model_from_pure(cfg, pure, param_dtype=param_dtype)


def model_from_pure(cfg: ModelConfig, pure: dict, *, param_dtype=jnp.float32) -> Transformer:
  model = abstract_model(cfg, param_dtype=param_dtype)
  graphdef, state = nnx.split(model)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
  return nnx.merge(graphdef, state)


def export_tensors(model: Transformer, *, dtype=None) -> dict[str, np.ndarray]:
  """Our params -> {HF name: numpy array in torch [out, in] layout}."""
  flat = {k: np.asarray(v) for k, v in _flat_params(model).items()}
  out = {}
  for hf, (ours, layer, transpose) in name_map(model.cfg).items():
    arr = flat[ours] if layer is None else flat[ours][layer]
    if dtype is not None:
      arr = arr.astype(np.dtype(dtype))
    out[hf] = np.ascontiguousarray(arr.T if transpose else arr)
  return out


def save_hf_checkpoint(model: Transformer, out_dir: str, *, dtype=None,
                       max_shard_bytes: int = 5 * 10**9, write_config: bool = True) -> list[str]:
  """Write safetensors in the real naming; shard by ``max_shard_bytes`` with an index.

  Returns the files written. One shard -> ``model.safetensors`` and no index.
  """
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
  os.makedirs(out_dir, exist_ok=True)
  for old in os.listdir(out_dir):  # stale shards or index would shadow the new files
    if old == INDEX_FILE or (old.startswith("model") and old.endswith(".safetensors")):
      os.remove(os.path.join(out_dir, old))
  tensors = export_tensors(model, dtype=dtype)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, arr in tensors.items():
    if shards[-1] and size + arr.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = arr
    size += arr.nbytes
  written = []
  if len(shards) == 1:
    p = os.path.join(out_dir, SINGLE_FILE)
    save_file(shards[0], p, metadata={"format": "pt"})
    written.append(p)
  else:
    weight_map = {}
    n = len(shards)
    for k, shard in enumerate(shards):
      fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
      save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
      written.append(os.path.join(out_dir, fname))
      weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))},
             "weight_map": weight_map}
    p = os.path.join(out_dir, INDEX_FILE)
    with open(p, "w") as fh:
      json.dump(index, fh, indent=2)
    written.append(p)
  if write_config:
    p = os.path.join(out_dir, "config.json")
    with open(p, "w") as fh:
      json.dump(model.cfg.to_hf_dict(), fh, indent=2)
    written.append(p)
  return written
