"""The decode head: hidden rows -> (token, confidence) -> which tokens to commit.

  plan.py        LogitPlan: which logit variant and tile sizes turn rows into decisions
  budgeter.py    picks the plan from an activation budget (and measured times: calibration.py)
  variants.py    full / rows / row_chunked / vocab_tiled (the fused Pallas kernel on GPU)
  decode.py      the engine's decode head: the step's candidates -> (x0, commit), TP included
  rules.py       confidence kinds and commit rules (fixed, threshold, factor)
  schedule.py    tokens per step: LLaDA's per-block schedule, Dream's timesteps

The counter-based noise and the online logit statistics live with the kernels
(pallas_kernels/noise.py, pallas_kernels/fused_lm_head/stats.py), which import nothing of
dllm_jax.
"""
