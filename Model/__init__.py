"""SAT models. Importing this package registers the ``deit_sat_*`` architectures with timm."""
from . import sat  # noqa: F401  (registers the architectures)
from .build import (build_model, build_model_from_checkpoint, check_pretrained, checkpoint_weights, list_archs,
                    model_spec)
from .losses import SATLoss, batch_area_loss, normalization_loss, sat_loss
from .sat import SATVisionTransformer

__all__ = ["build_model", "build_model_from_checkpoint", "check_pretrained", "checkpoint_weights", "list_archs",
           "model_spec", "SATVisionTransformer", "SATLoss", "sat_loss", "batch_area_loss", "normalization_loss"]
