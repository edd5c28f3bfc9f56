"""spa_core: Select and Pack Attention (SPA, arXiv 2410.23608) in a Swin-style backbone.

Gate -> select -> pack -> attention -> unpack, the selection labels and the gate loss, and the
backbone family with its dense baseline. ``spa_core.pack.pack`` / ``unpack`` are imported from their
module (``import spa_core.pack`` gives the module). Imports neither Ray nor DeepSpeed; the fast paths come from
``kernels``.
"""

from spa_core.attention import PackedAttention, containers_dense_attention, packed_attention
from spa_core.backbone import BackboneFeatures, BackboneOutput, SPABackbone, build_backbone, stage_grids
from spa_core.block import SPABlock, SPABlockInfo, SwinBlock
from spa_core.config import BACKBONE_PRESETS, BackboneConfig, ConfigError, SPAConfig, backbone_preset
from spa_core.gate import LinearGate, resize_scores
from spa_core.labels import boxes_to_mask, selection_labels_from_boxes, selection_labels_from_masks
from spa_core.loss import gate_loss
from spa_core.pack import PackedTokens, containers_dense, containers_from_dense
from spa_core.registry import (
    GATES,
    MODEL_VARIANTS,
    PACK_STRATEGIES,
    SELECTION_POLICIES,
    SUPERVISION_MODES,
)
from spa_core.select import Selection, select_tokens
from spa_core.strategies import PackStrategy
from spa_core.windows import window_order

__all__ = [
    "BACKBONE_PRESETS",
    "BackboneConfig",
    "BackboneFeatures",
    "BackboneOutput",
    "ConfigError",
    "GATES",
    "LinearGate",
    "MODEL_VARIANTS",
    "PACK_STRATEGIES",
    "PackedAttention",
    "PackStrategy",
    "PackedTokens",
    "SELECTION_POLICIES",
    "SPABackbone",
    "SPABlock",
    "SPABlockInfo",
    "SPAConfig",
    "SUPERVISION_MODES",
    "Selection",
    "SwinBlock",
    "backbone_preset",
    "boxes_to_mask",
    "build_backbone",
    "containers_dense",
    "containers_dense_attention",
    "containers_from_dense",
    "gate_loss",
    "packed_attention",
    "resize_scores",
    "select_tokens",
    "selection_labels_from_boxes",
    "selection_labels_from_masks",
    "stage_grids",
    "window_order",
]
