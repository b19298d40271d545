"""Shared fixtures of the server tests: a tiny LLaDA-layout model directory, a live server.

``tiny_model_dir(path)`` writes a random-weight LLaDA-layout checkpoint (config.json +
model.safetensors) and a tiny byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json,
the demo tokenizer's recipe with ~300 ids) that ``dllm_jax.tokenizer.load_tokenizer`` loads.
``LiveServer`` runs an app on the server's own transport in a background thread on a free
loopback port.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import tempfile

TINY_VOCAB = 300
# Plain text for the tokenizer's merges (what it learns does not matter, only that it is fixed).
_TEXTS = [
    "The socket module provides access to the BSD socket interface.",
    "Return a new list containing all items from the iterable in ascending order.",
    "The json module can serialize Python objects to a string and back again.",
    "Open the file and return a stream; raise OSError upon failure.",
    "A dictionary maps hashable keys to arbitrary values.",
] * 4


def tiny_config(vocab_size: int, max_position: int = 256) -> dict:
  from dllm_jax.train.tokenizer_train import SPECIAL_TOKENS
  ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
  return dict(model_type="llada", d_model=32, n_layers=2, n_heads=4, n_kv_heads=4,
              mlp_hidden_size=64, vocab_size=vocab_size, embedding_size=vocab_size,
              max_sequence_length=max_position, rope_theta=10000.0, rms_norm_eps=1e-5,
              mask_token_id=ids["<|mask|>"], eos_token_id=ids["<|eos|>"],
              pad_token_id=ids["<|pad|>"],
              dllm_jax_token_ids={"eot_token_id": ids["<|eot|>"],
                                  "bos_token_id": ids["<|bos|>"]})


def tiny_model_dir(path: str, *, max_position: int = 256, seed: int = 0) -> str:
  """Write the tiny model + tokenizer into ``path`` (created) and return it."""
  from dllm_jax.config import ModelConfig
  from dllm_jax.model.loader import save_hf_checkpoint
  from dllm_jax.model.transformer import init_model
  from dllm_jax.train.tokenizer_train import save_tokenizer, train_bpe

  os.makedirs(path, exist_ok=True)
  tok = train_bpe(_TEXTS, vocab_size=TINY_VOCAB)
  save_tokenizer(tok, path, model_max_length=max_position)
  vocab = tok.get_vocab_size()
  model = init_model(ModelConfig.from_dict(tiny_config(vocab, max_position)), seed=seed)
  save_hf_checkpoint(model, path)
  with open(os.path.join(path, "generation_config.json"), "w") as fh:
    json.dump({"gen_length": 32, "block_length": 16, "steps": 32}, fh)
  return path


_SHARED_DIR: str | None = None


def shared_model_dir() -> str:
  """One tiny model directory per test process (built on first use, removed at exit)."""
  global _SHARED_DIR
  if _SHARED_DIR is None:
    d = tempfile.mkdtemp(prefix="dllm_server_tiny_")
    atexit.register(shutil.rmtree, d, True)
    _SHARED_DIR = tiny_model_dir(os.path.join(d, "tiny-llada"))
  return _SHARED_DIR


def tiny_engine_config(**overrides):
  """The engine config every server test uses (same shapes -> compiled steps are shared
  through the persistent compilation cache)."""
  from dllm_jax.config import EngineConfig
  kw = dict(max_running=2, max_waiting=8, token_budget=1024, logits="rows",
            max_refresh_rows=2, max_reuse_rows=2)
  kw.update(overrides)
  return EngineConfig(**kw)


def enable_compile_cache() -> None:
  """Persist XLA executables across test modules and runs (semantics unchanged; the tiny
  model's step takes seconds to compile on 2 CPU cores). Off with DLLM_TEST_NO_JAX_CACHE=1."""
  import jax
  if os.environ.get("DLLM_TEST_NO_JAX_CACHE") or jax.config.jax_compilation_cache_dir:
    return
  d = os.environ.get("DLLM_TEST_JAX_CACHE",
                     os.path.join(tempfile.gettempdir(), "dllm_jax_test_xla_cache"))
  jax.config.update("jax_compilation_cache_dir", d)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def make_llm(**engine_overrides):
  from dllm_jax.engine.engine import LLM
  enable_compile_cache()
  return LLM(shared_model_dir(), engine_config=tiny_engine_config(**engine_overrides))


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class LiveServer:
  """``app`` served by ``dllm_jax.server.transport`` (the guarded h11 protocol the CLI uses) on
  127.0.0.1:<ephemeral port> in a daemon thread. ``limits``: transport keywords
  (header_timeout_s, body_timeout_s, max_connections, shutdown_timeout_s)."""

  def __init__(self, app, *, startup_timeout: float = 120.0, **limits):
    from dllm_jax.server.transport import ServerThread
    self.app = app
    self._thread = ServerThread(app, startup_timeout_s=startup_timeout, **limits)
    self.server = self._thread.server
    self.port = self._thread.port
    self.url = self._thread.url

  def stop(self, timeout: float = 30.0) -> None:
    self._thread.stop(timeout)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.stop()
