import os

# Tests run on one CPU device in float32; keep XLA from grabbing every core for one test.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
