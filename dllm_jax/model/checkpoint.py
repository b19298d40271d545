"""orbax save / restore of model parameters (a pure dict of the NNX Param state), and the
non-weight files a converted checkpoint carries along (tokenizer, generation config, ...)."""

from __future__ import annotations

import json
import os
import shutil

import jax
import orbax.checkpoint as ocp
from flax import nnx

from dllm_jax.config import ModelConfig
from dllm_jax.model.loader import model_from_pure
from dllm_jax.model.transformer import Transformer, abstract_model


def save_params(model: Transformer, path: str) -> None:
  """Write the params to a new orbax directory ``path`` (must not exist) plus config.json."""
  path = os.path.abspath(path)
  if os.path.exists(path):
    raise FileExistsError(f"{path} already exists; orbax will not overwrite it")
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(path, "params"), pure)
  ckptr.wait_until_finished()
  with open(os.path.join(path, "config.json"), "w") as fh:
    json.dump(model.cfg.to_hf_dict(), fh, indent=2)


def restore_params(path: str, *, cfg: ModelConfig | None = None, param_dtype=None) -> Transformer:
  """Restore a model saved by :func:`save_params` (dtypes as saved unless ``param_dtype``)."""
  path = os.path.abspath(path)
  if not os.path.isdir(os.path.join(path, "params")):
    raise FileNotFoundError(f"no orbax params at {path}/params")
  cfg = cfg or ModelConfig.from_json(path)
  ckptr = ocp.StandardCheckpointer()
  meta = ckptr.metadata(os.path.join(path, "params"))
  tree = getattr(meta, "item_metadata", meta)
  saved_dtype = jax.tree.leaves(tree)[0].dtype
  target_dtype = param_dtype or saved_dtype
  abstract = nnx.to_pure_dict(nnx.state(abstract_model(cfg, param_dtype=saved_dtype), nnx.Param))
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)
  pure = ckptr.restore(os.path.join(path, "params"), target)
  pure = jax.tree.map(lambda x: x.astype(target_dtype), pure)
  return model_from_pure(cfg, pure, param_dtype=target_dtype)


# Weight files of the formats a model directory may hold; everything else at the top level
# (config.json, tokenizer files, generation_config.json, chat template, model card) is carried
# over by a conversion.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf",
                    ".index.json")


def copy_sidecars(src: str, dst: str) -> list[str]:
  """Copy the non-weight top-level files of model directory ``src`` into ``dst`` (the source's
  config.json replaces a generated one, keeping fields we do not parse). Returns the names."""
  copied = []
  for name in sorted(os.listdir(src)):
    path = os.path.join(src, name)
    if not os.path.isfile(path) or name.endswith(_WEIGHT_SUFFIXES) or name.startswith("."):
      continue
    shutil.copyfile(path, os.path.join(dst, name))
    copied.append(name)
  return copied
