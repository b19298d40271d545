"""Fused LM head: vocab-tiled logits -> (token, confidence, margin, entropy) per row."""

from pallas_kernels.fused_lm_head.ops import Blocks, FusedOut, fused_lm_head, kernel_blocks
from pallas_kernels.fused_lm_head.reference import fused_lm_head_reference
from pallas_kernels.fused_lm_head.tiles import TileConfig, tile_config

__all__ = ["Blocks", "FusedOut", "TileConfig", "fused_lm_head", "fused_lm_head_reference",
           "kernel_blocks", "tile_config"]
