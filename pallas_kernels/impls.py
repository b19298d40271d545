"""The kernel implementation names (no imports: the CLI and configs read it without jax).

auto       the Pallas kernel on a GPU, the jnp reference elsewhere
pallas     the Pallas kernel (GPU; lowers for 'cuda' on any machine)
mosaic     head-sparse attention only: the Mosaic GPU kernel (Hopper; lowers for 'cuda' anywhere)
reference  plain jnp (the CPU path and the oracle)
interpret  the Pallas kernel under the CPU interpreter (tests)
callback   test-only: the kernel's operands through an opaque jax.pure_callback
"""

KERNEL_IMPLS = ("auto", "pallas", "mosaic", "reference", "interpret", "callback")
TEST_ONLY_IMPLS = ("callback",)  # not offered by the benchmarks' flags
