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

The data stream is train/data.py, the held-out scores train/evaluation.py, the HF-layout export
train/export.py; this module is the loss, the loop, its checkpoints and ``dllm-jax train-demo``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from dllm_jax import checks
from dllm_jax.config import ModelConfig
from dllm_jax.model.transformer import Transformer, count_params, init_model, lm_head_logits
from dllm_jax.train.data import sample_windows, token_stream
from dllm_jax.train.evaluation import (  # noqa: F401 (eval_windows re-exported)
    eval_windows, masked_accuracy, most_frequent_token, unigram_baseline_accuracy)
from dllm_jax.train.export import export_bundle

EPS = 1e-3
T_SAMPLINGS = ("stratified", "uniform")


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
    checks.require_ints(self, ("steps", "batch", "seq_len", "ckpt_every", "log_every"))
    if not self.lr > 0:
      raise ValueError(f"lr: must be > 0, got {self.lr}")
    if not 0 < self.eps < 1:
      raise ValueError(f"eps: must be in (0, 1), got {self.eps}")
    checks.require_choice("t_sampling", self.t_sampling, T_SAMPLINGS)

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


# CLI ------------------------------------------------------------------------------------------

def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  d = TrainConfig()
  parser.add_argument("--out", required=True, help="run directory (tokenizer, checkpoints, log)")
  for field, text in (("steps", "optimizer steps"), ("batch", "sequences per step"),
                      ("seq_len", "tokens per training sequence"),
                      ("seed", "seed of the initialisation, data order and masks"),
                      ("ckpt_every", "steps between orbax checkpoints")):
    parser.add_argument("--" + field.replace("_", "-"), type=int, default=getattr(d, field),
                        help=text + " (default %(default)s)")
  parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
  parser.add_argument("--t-sampling", choices=T_SAMPLINGS, default=d.t_sampling,
                      help="per-sequence mask rates: stratified over the batch, or i.i.d.")
  parser.add_argument("--resume", action="store_true",
                      help="continue from the latest checkpoint in --out")
  parser.add_argument("--config-size", choices=sorted(SIZES), default="demo",
                      help="model size preset (default %(default)s)")
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
