"""Test plugin: model variants that fail on purpose, for the run path's failure isolation.

``explode`` raises in its forward; ``nan_features`` returns NaN features (so the loss is NaN).
"""

from spa_core.backbone import SPABackbone
from spa_core.registry import MODEL_VARIANTS

EXPLODE_MESSAGE = "boom: the explode variant fails in its forward on purpose"


class _Exploding(SPABackbone):
    def forward(self, images, image_sizes=None):
        raise RuntimeError(EXPLODE_MESSAGE)


class _NaNFeatures(SPABackbone):
    def forward(self, images, image_sizes=None):
        out = super().forward(images, image_sizes)
        out.features = [f * float("nan") for f in out.features]
        return out


MODEL_VARIANTS.register("explode", lambda cfg: _Exploding(cfg))
MODEL_VARIANTS.register("nan_features", lambda cfg: _NaNFeatures(cfg))
