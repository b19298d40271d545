"""Prometheus metrics of the server (one registry per app, text format at GET /metrics).

Engine gauges are read at scrape time (queue depth, running, KV pages, tokens/s, phase mix);
request counters and latency histograms are updated as requests finish.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                   300.0)
_PATHS = {"/v1/completions", "/v1/chat/completions", "/v1/diffusion/generate", "/v1/models",
          "/health", "/metrics", "/"}
PHASE_WINDOW = 64  # steps over which the phase-mix gauges are averaged


class _EngineCollector:
  def __init__(self, worker):
    self.worker = worker

  def describe(self):
    return []

  def collect(self):
    w = self.worker
    if w is None:
      return
    core = w.core
    st = core.stats
    g = GaugeMetricFamily
    yield g("dllm_queue_depth", "Requests waiting for a running slot (what max_queue bounds)",
            value=w.waiting())
    yield g("dllm_running_requests", "Requests being decoded", value=core.num_running())
    yield g("dllm_in_flight_requests", "Requests accepted and not yet answered",
            value=w.in_flight())
    free, cap = core.pages.num_free, core.pages.capacity
    yield g("dllm_kv_pages_free", "Free KV cache pages", value=free)
    yield g("dllm_kv_pages_used", "KV cache pages in use", value=cap - free)
    yield g("dllm_kv_pages_total", "KV cache pages in the pool", value=cap)
    yield g("dllm_tokens_per_second", "Committed tokens per second over the last 10 s",
            value=w.tokens_per_second())
    yield g("dllm_engine_up", "1 while the engine thread runs", value=1.0 if w.alive else 0.0)
    mix = list(st.phase_mix[-PHASE_WINDOW:])
    refresh = sum(r for r, _ in mix)
    reuse = sum(u for _, u in mix)
    rows = refresh + reuse
    pm = GaugeMetricFamily("dllm_phase_mix_fraction",
                           f"Share of Refresh / Reuse rows over the last {PHASE_WINDOW} steps",
                           labels=["phase"])
    pm.add_metric(["refresh"], refresh / rows if rows else 0.0)
    pm.add_metric(["reuse"], reuse / rows if rows else 0.0)
    yield pm
    c = CounterMetricFamily
    yield c("dllm_engine_steps", "Engine steps run", value=st.steps)
    yield c("dllm_committed_tokens", "Tokens committed by the engine", value=st.committed_tokens)
    rows_f = CounterMetricFamily("dllm_phase_rows", "Rows scheduled per phase",
                                 labels=["phase"])
    rows_f.add_metric(["refresh"], st.refresh_rows)
    rows_f.add_metric(["select"], st.select_rows)
    rows_f.add_metric(["reuse"], st.reuse_rows)
    yield rows_f
    yield c("dllm_engine_host_seconds", "Host time spent in engine steps", value=st.host_seconds)
    yield c("dllm_engine_device_seconds", "Device time spent in engine steps",
            value=st.device_seconds)
    yield c("dllm_engine_step_errors", "Engine steps that raised", value=w.step_errors)
    yield c("dllm_requests_failed", "Requests failed by engine errors", value=w.requests_failed)
    yield c("dllm_requests_retried", "Requests restarted after an engine error",
            value=w.requests_retried)


class ServerMetrics:
  def __init__(self):
    self.registry = CollectorRegistry(auto_describe=False)
    r = self.registry
    self.http = Counter("dllm_http_responses", "HTTP responses by path and status",
                        ["path", "status"], registry=r)
    self.rejections = Counter("dllm_requests_rejected", "Generation requests refused",
                              ["reason"], registry=r)
    self.disconnects = Counter("dllm_client_disconnects",
                               "Clients that went away before their answer was complete",
                               ["stage"], registry=r)
    self.latency = Histogram("dllm_request_latency_seconds",
                             "End-to-end latency of generation requests", ["endpoint"],
                             buckets=LATENCY_BUCKETS, registry=r)
    self.ttft = Histogram("dllm_time_to_first_token_seconds",
                          "Time until the first committed prefix token", ["endpoint"],
                          buckets=LATENCY_BUCKETS, registry=r)
    self.nfe = Histogram("dllm_request_nfe", "Forward passes per finished request",
                         buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
                         registry=r)
    self.prompt_tokens = Counter("dllm_prompt_tokens", "Prompt tokens of answered requests",
                                 registry=r)
    self.completion_tokens = Counter("dllm_completion_tokens",
                                     "Completion tokens of answered requests", registry=r)
    self._engine = _EngineCollector(None)
    r.register(self._engine)

  def bind(self, worker) -> None:
    self._engine.worker = worker

  # Hooks ----------------------------------------------------------------------------------------
  def on_finish(self, handle, out) -> None:  # engine thread
    self.nfe.observe(out.nfe)

  def observe(self, endpoint: str, handle, completion_tokens: int, prompt_tokens: int) -> None:
    now = time.perf_counter()
    self.latency.labels(endpoint).observe(now - handle.t0)
    if handle.first_token_t is not None:
      self.ttft.labels(endpoint).observe(handle.first_token_t - handle.t0)
    self.prompt_tokens.inc(prompt_tokens)
    self.completion_tokens.inc(completion_tokens)

  def rejected(self, reason: str) -> None:
    self.rejections.labels(reason).inc()

  def client_gone(self, stage: str) -> None:
    """A client abort: ``stage`` "body" (while its request body was read) or "generation"."""
    self.disconnects.labels(stage).inc()

  def render(self) -> tuple[bytes, str]:
    return generate_latest(self.registry), CONTENT_TYPE_LATEST

  def middleware_class(self):
    metrics = self

    class _Count:
      """Pure ASGI middleware (keeps streaming and disconnect handling untouched)."""

      def __init__(self, app):
        self.app = app

      async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
          return await self.app(scope, receive, send)
        path = scope.get("path", "")
        path = path if path in _PATHS else ("/v1/models/{id}" if path.startswith("/v1/models/")
                                           else "other")

        async def _send(message):
          if message["type"] == "http.response.start":
            metrics.http.labels(path, str(message["status"])).inc()
          await send(message)

        return await self.app(scope, receive, _send)

    return _Count
