"""Block sizes of the fused LM head kernel per GPU generation and row count.

Where each number comes from (``TileConfig.source`` says the same per entry):

  generation  rows     rows x vocab x k  warps stages  source
  hopper      >= 256   128 x 256 x 32    8     4       measured: issue #16 probe on an H200 (jax
                                                       0.11.2), 1024 x 4096 @ 4096 x 126464 bf16
                                                       in 0.88x the time of XLA's dot + argmax +
                                                       max-softmax (old defaults: 1.95x)
  hopper      < 256    64 x 256 x 32     4     4       assumed: the probe's vocab / k / stages with
                                                       half the rows and half the warps (the same
                                                       128 f32 accumulators per thread); a 128-row
                                                       block would be mostly padding. Not measured.
  other       any      64 x 128 x 64     4     2       measured to run (1.95x the plain matmul) on
                                                       the H200: the kernel's defaults before issue
                                                       #16; 48 KiB of bf16 stages fit any CUDA GPU
                                                       since Volta. The conservative choice for
                                                       Ampere, Ada, Blackwell and unknown devices.

Hopper = compute capability 9.x (H100, H200, GH200, H800, H20). ``TARGET_PROGRAMS`` is two waves
over the SMs (``device.core_count``; 132 on H100 SXM / H200, assumed when unknown).

Triton limits are kept here rather than discovered on a GPU: every block a power of two, rows
and k >= 16 (``tl.dot`` minimum), and the pipelined shared memory ``stages * (rows*k + k*vocab) *
itemsize`` within ``SMEM_SHARE`` of the SM's shared memory (f32 inputs drop stages, then halve
k). The last two pass the CPU lowering tests and fail only in Triton's compiler on the device. Explicit block arguments to ``ops.fused_lm_head`` override any
field.
"""

from __future__ import annotations

import dataclasses

import jax

SMEM_BYTES = {"hopper": 227 * 1024, "ampere": 163 * 1024, "other": 99 * 1024}  # per block, opt-in
SMEM_SHARE = 0.75  # leave room for Triton's reduction / layout-conversion scratch (assumed)
TARGET_PROGRAMS = 264  # 2 waves x 132 SMs (H100 SXM, H200) when the SM count is unknown
MIN_DOT = 16


def _pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class TileConfig:
  block_rows: int
  block_vocab: int
  block_k: int
  num_warps: int
  num_stages: int
  source: str = ""

  def __post_init__(self):
    for name in ("block_rows", "block_vocab", "block_k", "num_warps"):
      if not _pow2(getattr(self, name)):
        raise ValueError(f"{name}: must be a power of two (Triton), got {getattr(self, name)}")
    if self.num_stages < 1:
      raise ValueError(f"num_stages: must be >= 1, got {self.num_stages}")

  def smem_bytes(self, itemsize: int) -> int:
    """Shared memory of the pipelined operand tiles (hidden [rows, k] + head [k, vocab])."""
    return self.num_stages * (self.block_rows + self.block_vocab) * self.block_k * itemsize

  def replace(self, **kw) -> "TileConfig":
    return dataclasses.replace(self, **kw)


HOPPER = TileConfig(128, 256, 32, 8, 4, "measured: issue #16 H200 probe, 0.88x plain matmul @1024")
HOPPER_SMALL = TileConfig(64, 256, 32, 4, 4, "assumed: Hopper probe with half rows and warps")
DEFAULT = TileConfig(64, 128, 64, 4, 2, "measured to run on H200 (1.95x); conservative default")
HOPPER_MIN_ROWS = 256  # from this many rows the 128-row block is used

# Every configuration the table can return, for tests (interpret + cuda lowering) and docs.
SHIPPED = {"hopper": HOPPER, "hopper_small": HOPPER_SMALL, "default": DEFAULT}


def generation(device_kind: str | None, compute_capability: str | None = None) -> str:
  """'hopper', 'ampere' or 'other' from a device kind ("NVIDIA H200") or capability ("9.0")."""
  if compute_capability:
    major = str(compute_capability).split(".")[0]
    if major == "9":
      return "hopper"
    if major == "8":
      return "ampere"
  kind = (device_kind or "").upper()
  if any(tag in kind for tag in ("H100", "H200", "GH200", "H800", "H20")):
    return "hopper"
  if any(tag in kind for tag in ("A100", "A800", "A40", "A30", "A10", "A16", "A2", "RTX 30")):
    return "ampere"
  return "other"


def local_device():
  """(device_kind, compute_capability or None, core_count or None) of the default device."""
  d = jax.devices()[0]
  return d.device_kind, getattr(d, "compute_capability", None), getattr(d, "core_count", None)


def _fit_smem(cfg: TileConfig, itemsize: int, gen: str) -> TileConfig:
  limit = SMEM_SHARE * SMEM_BYTES.get(gen, SMEM_BYTES["other"])
  while cfg.smem_bytes(itemsize) > limit and cfg.num_stages > 2:
    cfg = cfg.replace(num_stages=cfg.num_stages - 1)
  while cfg.smem_bytes(itemsize) > limit and cfg.block_k > MIN_DOT:
    cfg = cfg.replace(block_k=cfg.block_k // 2)
  return cfg


def tile_config(rows: int, itemsize: int = 2, device_kind: str | None = None,
                compute_capability: str | None = None) -> TileConfig:
  """The kernel's blocks for ``rows`` candidate rows of a head with ``itemsize``-byte elements.

  device_kind / compute_capability default to the default device's (a CPU gives DEFAULT).
  """
  if device_kind is None and compute_capability is None:
    device_kind, compute_capability, _ = local_device()
  gen = generation(device_kind, compute_capability)
  if gen == "hopper":
    cfg = HOPPER if rows >= HOPPER_MIN_ROWS else HOPPER_SMALL
  else:
    cfg = DEFAULT
  return _fit_smem(cfg, itemsize, gen)


def target_programs(core_count: int | None) -> int:
  """About two waves of programs over ``core_count`` SMs (an 8-warp 128 x 256 program fills an
  SM); TARGET_PROGRAMS when the count is unknown."""
  return 2 * int(core_count) if core_count else TARGET_PROGRAMS
