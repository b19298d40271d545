"""Fused LM head: vocab-tiled logits -> (token, confidence, margin, entropy) per row."""

from pallas_kernels.fused_lm_head.ops import FusedOut, fused_lm_head, kernel_blocks
from pallas_kernels.fused_lm_head.reference import fused_lm_head_reference

__all__ = ["FusedOut", "fused_lm_head", "fused_lm_head_reference", "kernel_blocks"]
