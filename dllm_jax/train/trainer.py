"""Masked-diffusion pre-training (LLaDA) of the bundled demo model, plus its held-out evaluation.

One step (LLaDA ``forward_process`` + loss): windows ``x`` [B, S] of the tokenized train stream;
per sequence ``t ~ U(0, 1)``, ``p = (1 - eps) t + eps``; every token is replaced by the mask id
independently with probability ``p``; the loss is the cross-entropy on masked positions weighted
``1 / p``, summed and divided by ``B * S``. By default the B rates are stratified over the batch
(``t_i = (i + u) / B``: each still marginally U(0, 1), so the loss stays unbiased, with less
variance at a small batch); ``t_sampling="uniform"`` draws them i.i.d. as LLaDA does.

Determinism and resume: window starts come from a seeded numpy ``Generator`` whose state is saved in
every checkpoint; the masking noise is ``fold_in(PRNGKey(seed), step)``, a pure function of the
step. A checkpoint holds params, optimiser state, step and the data RNG state, so a resumed run
computes bit-identical params to an uninterrupted one (same machine, float32 on CPU).

Run directory layout (``--out``): ``tokenizer/`` (BPE, trained on first use), ``ckpt/`` (orbax
CheckpointManager), ``log.jsonl`` (one line per logged step), ``summary.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import shutil
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from dllm_jax.config import ModelConfig
from dllm_jax.model.transformer import Transformer, count_params, init_model, lm_head_logits

EPS = 1e-3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# Default sampling settings shipped with the demo model (LLaDA generate.py names).
DEMO_GENERATION_CONFIG = {
    "gen_length": 64, "steps": 64, "block_length": 32, "temperature": 0.0,
    "remasking": "low_confidence", "cfg_scale": 0.0,
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation and data settings of one run. ``warmup`` None -> 5% of ``steps``."""

  steps: int = 2000
  batch: int = 16
  seq_len: int = 128
  lr: float = 3e-3
  end_lr_ratio: float = 0.1
  warmup: int | None = None
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  seed: int = 0
  eps: float = EPS
  ckpt_every: int = 100
  chat_fraction: float = 0.5
  log_every: int = 10
  # "stratified": t_i = (i + u) / B, one u per batch (unbiased, lower-variance; MDLM's
  # low-discrepancy sampler); "uniform": i.i.d. t_i ~ U(0, 1) as LLaDA.
  t_sampling: str = "stratified"

  def __post_init__(self):
    for f in ("steps", "batch", "seq_len", "ckpt_every", "log_every"):
      if getattr(self, f) < 1:
        raise ValueError(f"{f}: must be >= 1, got {getattr(self, f)}")
    if not self.lr > 0:
      raise ValueError(f"lr: must be > 0, got {self.lr}")
    if not 0 < self.eps < 1:
      raise ValueError(f"eps: must be in (0, 1), got {self.eps}")
    if self.t_sampling not in ("uniform", "stratified"):
      raise ValueError(f"t_sampling: expected 'uniform' or 'stratified', got {self.t_sampling!r}")

  @property
  def warmup_steps(self) -> int:
    return self.warmup if self.warmup is not None else max(1, self.steps // 20)


# Model sizes ----------------------------------------------------------------------------------

SIZES = {
    # 1.64 M params with the 3072-token vocabulary (0.85 M in the blocks). The narrow width is
    # chosen for CPU throughput: masked-diffusion training sits on the unigram plateau for the
    # first several hundred steps, so steps per minute matter more than width here.
    "demo": dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4,
                 intermediate_size=384, max_position=512),
    # For tests and smoke runs: seconds per hundred steps.
    "tiny": dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
                 intermediate_size=64, max_position=256),
}


def model_config(size: str, *, vocab_size: int, mask_token_id: int, eos_token_id: int,
                 pad_token_id: int, eot_token_id: int | None = None,
                 bos_token_id: int | None = None) -> ModelConfig:
  if size not in SIZES:
    raise ValueError(f"config size: expected one of {sorted(SIZES)}, got {size!r}")
  return ModelConfig(family="llada", vocab_size=vocab_size, rope_theta=10000.0, rms_norm_eps=1e-5,
                     mask_token_id=mask_token_id, eos_token_id=eos_token_id,
                     pad_token_id=pad_token_id, eot_token_id=eot_token_id,
                     bos_token_id=bos_token_id, name=f"dllm-jax-{size}", **SIZES[size])


def model_config_for_tokenizer(size: str, tok) -> ModelConfig:
  """``tok``: a :class:`dllm_jax.tokenizer.Tokenizer`."""
  return model_config(size, vocab_size=tok.vocab_size, mask_token_id=tok.mask_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      eot_token_id=tok.eot_token_id, bos_token_id=tok.bos_token_id)


# Data -----------------------------------------------------------------------------------------

def _encode_all(tok, docs: Sequence[str]) -> list[list[int]]:
  fast = getattr(getattr(tok, "hf", None), "backend_tokenizer", None)
  if fast is not None:  # the Rust batch encoder: same ids as tok.encode, much faster
    return [e.ids for e in fast.encode_batch(list(docs), add_special_tokens=False)]
  return [tok.encode(d, add_special_tokens=False) for d in docs]


def token_stream(docs: Sequence[str], tok, *, chat_fraction: float = 0.0,
                 seed: int = 0) -> np.ndarray:
  """All documents as one int32 stream [T], each followed by eos.

  A seeded ``chat_fraction`` of the documents is written in the chat format instead (first line as
  the user turn, the rest as the assistant turn, each closed by eot), so the demo model has seen
  its chat markers. Needs ``tok.bos_token_id`` / ``eot_token_id`` when ``chat_fraction > 0``.
  """
  docs = list(docs)
  chat = np.random.default_rng(seed).random(len(docs)) < chat_fraction
  if chat.any():
    user_id, asst_id = (tok.hf.convert_tokens_to_ids(t) for t in ("<|user|>", "<|assistant|>"))
    if None in (user_id, asst_id, tok.bos_token_id, tok.eot_token_id):
      raise ValueError("chat_fraction > 0 needs bos, eot, <|user|> and <|assistant|> tokens")
  texts, heads = [], []
  for d, c in zip(docs, chat):
    first, _, rest = d.partition("\n")
    rest = re.sub(r"\A[*=~^-]+\n", "", rest)  # a reST title underline belongs to neither turn
    if c and rest.strip():
      heads.append((first.strip(), rest.lstrip("\n")))
      texts.extend([heads[-1][0], heads[-1][1]])
    else:
      heads.append(None)
      texts.append(d)
  ids = iter(_encode_all(tok, texts))
  eos = tok.eos_token_id
  out: list[int] = []
  nl = _encode_all(tok, ["\n"])[0]
  for h in heads:
    if h is None:
      out.extend(next(ids))
    else:
      user, answer = next(ids), next(ids)
      # <|bos|><|user|>\n{first line}<|eot|><|assistant|>\n{rest}<|eot|>, as the chat template.
      out += [tok.bos_token_id, user_id] + nl + user
      out += [tok.eot_token_id, asst_id] + nl + answer
      out.append(tok.eot_token_id)
    out.append(eos)
  return np.asarray(out, np.int32)


def sample_windows(rng: np.random.Generator, stream: np.ndarray, batch: int,
                   seq_len: int) -> np.ndarray:
  """``batch`` random windows [batch, seq_len] int32 of ``stream`` (advances ``rng``)."""
  if len(stream) <= seq_len:
    raise ValueError(f"token stream of {len(stream)} tokens is shorter than seq_len {seq_len}")
  starts = rng.integers(0, len(stream) - seq_len + 1, size=batch)
  return stream[starts[:, None] + np.arange(seq_len)[None, :]]


# Loss and step --------------------------------------------------------------------------------

def diffusion_loss(model: Transformer, tokens: jax.Array, key: jax.Array, eps: float = EPS,
                   t_sampling: str = "uniform"):
  """LLaDA masked-diffusion loss of clean ``tokens`` [B, S]; returns (loss, metrics)."""
  b, s = tokens.shape
  k_t, k_m = jax.random.split(key)
  if t_sampling == "stratified":
    t = (jnp.arange(b, dtype=jnp.float32) + jax.random.uniform(k_t, (), jnp.float32)) / b
  else:
    t = jax.random.uniform(k_t, (b,), jnp.float32)
  p_mask = (1.0 - eps) * t + eps                                   # [B]
  masked = jax.random.uniform(k_m, (b, s), jnp.float32) < p_mask[:, None]
  noisy = jnp.where(masked, model.cfg.mask_token_id, tokens)
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  lengths = jnp.full((b,), s, jnp.int32)
  logits = lm_head_logits(model, model.refresh(noisy, positions, lengths))  # [B, S, V] f32
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)       # [B, S]
  loss = jnp.sum(jnp.where(masked, ce / p_mask[:, None], 0.0)) / (b * s)
  n = jnp.maximum(jnp.sum(masked), 1)
  acc = jnp.sum(masked & (jnp.argmax(logits, -1) == tokens)) / n
  return loss, {"loss": loss, "masked_ce": jnp.sum(jnp.where(masked, ce, 0.0)) / n, "acc": acc}


def make_optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
  """AdamW (LLaDA's betas and decay) with linear warm-up and cosine decay to end_lr_ratio * lr."""
  sched = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=tcfg.lr, warmup_steps=tcfg.warmup_steps,
      decay_steps=max(tcfg.steps, tcfg.warmup_steps + 1), end_value=tcfg.lr * tcfg.end_lr_ratio)
  # Decay matrices only, not RMSNorm weights.
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  return optax.chain(optax.clip_by_global_norm(tcfg.clip_norm),
                     optax.adamw(sched, b1=0.9, b2=0.95, eps=1e-8,
                                 weight_decay=tcfg.weight_decay, mask=decay_mask))


def make_train_step(graphdef, tx: optax.GradientTransformation, seed: int, eps: float = EPS,
                    t_sampling: str = "uniform"):
  """A jitted ``(params, opt_state, tokens [B,S], step) -> (params, opt_state, metrics)``.

  Works on the State split once from the model; the masking key is fold_in(seed, step).
  """
  base = jax.random.PRNGKey(seed)

  def step_fn(params, opt_state, tokens, step):
    def loss_fn(p):
      return diffusion_loss(nnx.merge(graphdef, p), tokens, jax.random.fold_in(base, step), eps,
                            t_sampling)
    grads, metrics = jax.grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return params, opt_state, metrics

  return jax.jit(step_fn, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=8)
def _cached_train_step(graphdef, tcfg: TrainConfig):
  """One jitted step per (model structure, settings): a resumed or repeated run in the same
  process reuses the compiled step instead of compiling it again."""
  return make_train_step(graphdef, make_optimizer(tcfg), tcfg.seed, tcfg.eps, tcfg.t_sampling)


# Checkpoints ----------------------------------------------------------------------------------

def _manager(ckpt_dir: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(ckpt_dir),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
      item_names=("state", "meta"))


def _save(mgr, step: int, params, opt_state, rng: np.random.Generator, meta: dict) -> None:
  # Host copies: the next step donates (overwrites) the device buffers while orbax writes.
  leaves = [np.array(x, copy=True) for x in jax.tree.leaves((params, opt_state))]
  meta = dict(meta, step=step, data_rng=rng.bit_generator.state)
  mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(leaves),
                                         meta=ocp.args.JsonSave(meta)), force=True)


def _restore(mgr, step: int, params, opt_state):
  """Restore ``step`` into the structure of (params, opt_state); returns (params, opt, meta)."""
  treedef = jax.tree.structure((params, opt_state))
  target = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in jax.tree.leaves((params, opt_state))]
  out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                  meta=ocp.args.JsonRestore()))
  params, opt_state = jax.tree.unflatten(treedef, [jnp.asarray(x) for x in out["state"]])
  return params, opt_state, out["meta"]


def _check_resumable(meta: dict, run_meta: dict) -> None:
  """A resumed run must compute what the interrupted one would have (checkpoint / log cadence
  may differ)."""
  saved_tc = meta.get("train_config", {})
  for k, v in run_meta["train_config"].items():
    if k not in ("ckpt_every", "log_every") and saved_tc.get(k) != v:
      raise ValueError(f"--resume: train_config.{k} is {v!r}, the checkpoint has "
                       f"{saved_tc.get(k)!r}; use the same settings")
  for k in ("model_config", "stream_tokens"):
    if meta.get(k) != json.loads(json.dumps(run_meta[k])):
      raise ValueError(f"--resume: {k} differs from the checkpoint's; use the same settings")


# Training loop --------------------------------------------------------------------------------

def train(cfg: ModelConfig, tcfg: TrainConfig, stream: np.ndarray, out_dir: str, *,
          resume: bool = False, stop_after: int | None = None,
          progress: bool = True) -> tuple[Transformer, list[dict]]:
  """Train (or resume) in ``out_dir``; returns the model and the logged metrics.

  ``stop_after``: stop (with a checkpoint) once this step is reached, as if interrupted -- the
  schedule still spans ``tcfg.steps``. A fresh run refuses a directory that has checkpoints.
  """
  os.makedirs(out_dir, exist_ok=True)
  mgr = _manager(os.path.join(out_dir, "ckpt"))
  model = init_model(cfg, param_dtype=jnp.float32, seed=tcfg.seed)
  graphdef, params = nnx.split(model)
  tx = make_optimizer(tcfg)
  opt_state = tx.init(params)
  rng = np.random.default_rng(tcfg.seed)
  run_meta = {"train_config": dataclasses.asdict(tcfg), "model_config": cfg.to_hf_dict(),
              "stream_tokens": int(len(stream))}
  start, elapsed = 0, 0.0
  latest = mgr.latest_step()
  if latest is not None:
    if not resume:
      raise FileExistsError(f"{out_dir}/ckpt already has checkpoints (step {latest}); pass "
                            f"--resume to continue, or use a new --out")
    params, opt_state, meta = _restore(mgr, latest, params, opt_state)
    _check_resumable(meta, run_meta)
    rng.bit_generator.state = meta["data_rng"]
    start, elapsed = int(meta["step"]), float(meta.get("elapsed_s", 0.0))

  step_fn = _cached_train_step(graphdef, dataclasses.replace(tcfg, ckpt_every=1, log_every=1))
  end = tcfg.steps if stop_after is None else min(tcfg.steps, stop_after)
  log_path = os.path.join(out_dir, "log.jsonl")
  history: list[dict] = []
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=tcfg.steps, initial=start, desc="train", dynamic_ncols=True,
               file=sys.stderr)
  t0 = time.perf_counter()
  with open(log_path, "a") as log:
    for step in range(start, end):
      tokens = sample_windows(rng, stream, tcfg.batch, tcfg.seq_len)
      params, opt_state, metrics = step_fn(params, opt_state, jnp.asarray(tokens),
                                           jnp.asarray(step, jnp.int32))
      done = step + 1
      if done % tcfg.log_every == 0 or done == end:
        m = {k: float(v) for k, v in metrics.items()}
        m.update(step=done, elapsed_s=round(elapsed + time.perf_counter() - t0, 2))
        history.append(m)
        log.write(json.dumps(m) + "\n")
        log.flush()
        if bar is not None:
          bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['acc']:.3f}")
      if bar is not None:
        bar.update(1)
      if done % tcfg.ckpt_every == 0 or done == end:
        _save(mgr, done, params, opt_state, rng,
              dict(run_meta, elapsed_s=elapsed + time.perf_counter() - t0))
  if bar is not None:
    bar.close()
  mgr.wait_until_finished()
  mgr.close()
  return nnx.merge(graphdef, params), history


# Evaluation -----------------------------------------------------------------------------------

def _as_stream(docs, tok, eos_id: int | None) -> np.ndarray:
  """Documents (strings, or token-id lists) -> one stream with eos between documents."""
  docs = list(docs)
  if docs and isinstance(docs[0], str):
    if tok is None:
      raise ValueError("text documents need a tokenizer")
    docs = _encode_all(tok, docs)
    eos_id = tok.eos_token_id if eos_id is None else eos_id
  out: list[int] = []
  for d in docs:
    out.extend(int(i) for i in d)
    if eos_id is not None:
      out.append(eos_id)
  return np.asarray(out, np.int32)


def eval_windows(docs, *, seq_len: int, ratio: float, seed: int, tokenizer=None,
                 eos_id: int | None = None, num_windows: int | None = None):
  """Consecutive non-overlapping windows [W, S] of the documents and an exact-fraction mask [W, S]
  (``round(ratio * S)`` positions per window, chosen by a seeded RNG)."""
  if not 0 < ratio <= 1:
    raise ValueError(f"ratio: must be in (0, 1], got {ratio}")
  stream = _as_stream(docs, tokenizer, eos_id)
  w = len(stream) // seq_len
  if num_windows is not None:
    w = min(w, num_windows)
  if w < 1:
    raise ValueError(f"held-out text has {len(stream)} tokens, fewer than seq_len {seq_len}")
  windows = stream[: w * seq_len].reshape(w, seq_len)
  rng = np.random.default_rng(seed)
  k = max(1, round(ratio * seq_len))
  mask = np.zeros((w, seq_len), bool)
  for i in range(w):
    mask[i, rng.permutation(seq_len)[:k]] = True
  return windows, mask


def masked_accuracy(model: Transformer, docs, ratio: float, seq_len: int = 128, seed: int = 0, *,
                    tokenizer=None, num_windows: int | None = None, batch: int = 16) -> float:
  """Argmax accuracy on masked positions of held-out windows, one forward pass per window.

  ``docs``: strings (tokenized with ``tokenizer``, eos between) or token-id lists.
  """
  windows, mask = eval_windows(docs, seq_len=seq_len, ratio=ratio, seed=seed, tokenizer=tokenizer,
                               eos_id=model.cfg.eos_token_id, num_windows=num_windows)
  graphdef, state = nnx.split(model)

  @jax.jit
  def predict(state, noisy):
    m = nnx.merge(graphdef, state)
    b, s = noisy.shape
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    h = m.refresh(noisy, pos, jnp.full((b,), s, jnp.int32))
    return jnp.argmax(lm_head_logits(m, h), axis=-1)

  correct = total = 0
  for i in range(0, len(windows), batch):
    x, msk = windows[i:i + batch], mask[i:i + batch]
    n = len(x)
    if n < batch:  # pad to one shape: one compilation
      x = np.concatenate([x, np.zeros((batch - n, seq_len), np.int32)])
      msk = np.concatenate([msk, np.zeros((batch - n, seq_len), bool)])
    noisy = np.where(msk, model.cfg.mask_token_id, x).astype(np.int32)
    pred = np.asarray(predict(state, jnp.asarray(noisy)))
    correct += int(np.sum((pred == x) & msk))
    total += int(np.sum(msk))
  return correct / total


def most_frequent_token(train_docs, tokenizer=None, eos_id: int | None = None) -> int:
  stream = _as_stream(train_docs, tokenizer, eos_id)
  return int(np.argmax(np.bincount(stream)))


def unigram_baseline_accuracy(train_docs, heldout_docs, tokenizer=None, *, ratio: float = 0.5,
                              seq_len: int = 128, seed: int = 0, num_windows: int | None = None,
                              eos_id: int | None = None, top_token: int | None = None) -> float:
  """Accuracy of always predicting the single most frequent token of the TRAIN stream (eos
  separators included), on exactly the masked positions :func:`masked_accuracy` scores with the
  same arguments. (A context-free predictor cannot do better than the best single token.)
  ``top_token`` skips re-counting the train documents."""
  top = most_frequent_token(train_docs, tokenizer, eos_id) if top_token is None else top_token
  windows, mask = eval_windows(heldout_docs, seq_len=seq_len, ratio=ratio, seed=seed,
                               tokenizer=tokenizer, eos_id=eos_id, num_windows=num_windows)
  return float(np.sum((windows == top) & mask) / np.sum(mask))


# Export ---------------------------------------------------------------------------------------

def export_bundle(model: Transformer, tokenizer_dir: str, out_dir: str, *,
                  generation_config: dict | None = None, dtype=jnp.bfloat16) -> list[str]:
  """The HF-layout model directory: config.json + model.safetensors (bf16), tokenizer files,
  generation_config.json."""
  from dllm_jax.model.loader import save_hf_checkpoint
  written = list(save_hf_checkpoint(model, out_dir, dtype=dtype))
  for f in TOKENIZER_FILES:
    shutil.copyfile(os.path.join(tokenizer_dir, f), os.path.join(out_dir, f))
    written.append(os.path.join(out_dir, f))
  p = os.path.join(out_dir, "generation_config.json")
  gen = dict(DEMO_GENERATION_CONFIG if generation_config is None else generation_config)
  gen.update(mask_token_id=model.cfg.mask_token_id, eos_token_id=model.cfg.eos_token_id,
             eot_token_id=model.cfg.eot_token_id, pad_token_id=model.cfg.pad_token_id)
  with open(p, "w") as fh:
    json.dump(gen, fh, indent=2)
    fh.write("\n")
  written.append(p)
  for f in written:  # safetensors writes 0600; package data must be world-readable
    os.chmod(f, 0o644)
  return written


# CLI ------------------------------------------------------------------------------------------

def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  d = TrainConfig()
  parser.add_argument("--out", required=True, help="run directory (tokenizer, checkpoints, log)")
  parser.add_argument("--steps", type=int, default=d.steps)
  parser.add_argument("--batch", type=int, default=d.batch)
  parser.add_argument("--seq-len", type=int, default=d.seq_len)
  parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
  parser.add_argument("--seed", type=int, default=d.seed)
  parser.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
  parser.add_argument("--t-sampling", choices=("stratified", "uniform"), default=d.t_sampling,
                      help="per-sequence mask rates: stratified over the batch, or i.i.d.")
  parser.add_argument("--resume", action="store_true",
                      help="continue from the latest checkpoint in --out")
  parser.add_argument("--config-size", choices=sorted(SIZES), default="demo")
  parser.add_argument("--vocab-size", type=int, default=None,
                      help="BPE vocabulary when --out has no tokenizer yet (default 3072)")
  parser.add_argument("--export", metavar="DIR", default=None,
                      help="write the HF-layout bundle (bf16 safetensors, tokenizer, configs)")
  parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
  return parser


def prepare_tokenizer(out_dir: str, vocab_size: int | None = None):
  """Load ``out_dir/tokenizer``, training it on the train split first if it is not there."""
  from dllm_jax.tokenizer import load_tokenizer
  from dllm_jax.train.tokenizer_train import DEFAULT_VOCAB_SIZE, train_demo_tokenizer
  tok_dir = os.path.join(out_dir, "tokenizer")
  if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
    train_demo_tokenizer(tok_dir, vocab_size=vocab_size or DEFAULT_VOCAB_SIZE)
  return load_tokenizer(tok_dir)


def _last_log_line(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path) as fh:
    lines = [ln for ln in fh if ln.strip()]
  return json.loads(lines[-1]) if lines else {}


def run_train(args: argparse.Namespace) -> int:
  """``dllm-jax train-demo``: tokenizer, training (or resume), evaluation, optional export."""
  from dllm_jax.train.corpus import load_corpus
  try:
    tcfg = TrainConfig(steps=args.steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr,
                       seed=args.seed, ckpt_every=args.ckpt_every, t_sampling=args.t_sampling)
    tok = prepare_tokenizer(args.out, args.vocab_size)
    cfg = model_config_for_tokenizer(args.config_size, tok)
    if tcfg.seq_len > cfg.max_position:
      raise ValueError(f"--seq-len {tcfg.seq_len} exceeds max_sequence_length {cfg.max_position}")
    train_docs = load_corpus("train")
    stream = token_stream(train_docs, tok, chat_fraction=tcfg.chat_fraction, seed=tcfg.seed)
    print(f"model {cfg.name}: {cfg.num_params():,} params; train stream {len(stream):,} tokens",
          file=sys.stderr)
    t0 = time.perf_counter()
    model, _ = train(cfg, tcfg, stream, args.out, resume=args.resume,
                     progress=not args.no_progress)
    wall = time.perf_counter() - t0
  except (FileExistsError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  heldout = load_corpus("heldout")
  acc = {str(r): masked_accuracy(model, heldout, r, tcfg.seq_len, seed=0, tokenizer=tok)
         for r in (0.15, 0.5, 0.9)}
  top = most_frequent_token(train_docs, tok)
  base = {str(r): unigram_baseline_accuracy(train_docs, heldout, tok, ratio=r,
                                            seq_len=tcfg.seq_len, seed=0, top_token=top)
          for r in (0.15, 0.5, 0.9)}
  last = _last_log_line(os.path.join(args.out, "log.jsonl"))  # also right after a no-op resume
  summary = {"params": count_params(model), "steps": tcfg.steps,
             "train_wall_s_this_run": round(wall, 1),
             "train_elapsed_s_total": last.get("elapsed_s"),
             "final_loss": last.get("loss"), "final_train_masked_acc": last.get("acc"),
             "heldout_masked_accuracy": acc, "unigram_baseline_accuracy": base,
             "train_config": dataclasses.asdict(tcfg), "config_size": args.config_size}
  with open(os.path.join(args.out, "summary.json"), "w") as fh:
    json.dump(summary, fh, indent=2)
  print(json.dumps(summary, indent=2))
  if args.export:
    for p in export_bundle(model, os.path.join(args.out, "tokenizer"), args.export):
      print(f"wrote {p}", file=sys.stderr)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = add_train_args(argparse.ArgumentParser(prog="dllm-jax train-demo"))
  return run_train(parser.parse_args(argv))


if __name__ == "__main__":
  raise SystemExit(main())
