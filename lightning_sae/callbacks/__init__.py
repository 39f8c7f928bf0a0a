"""Training-recipe callbacks, one trick per module."""

from lightning_sae.callbacks.calibration import EncoderBiasCalibration
from lightning_sae.callbacks.dead_features import DeadFeatureTracker
from lightning_sae.callbacks.decoder_bias import DecoderBiasInit
from lightning_sae.callbacks.downstream_eval import DownstreamEval
from lightning_sae.callbacks.duplicates import DuplicatePruning
from lightning_sae.callbacks.feature_recovery import FeatureRecovery
from lightning_sae.callbacks.folding import DecoderNormFolding
from lightning_sae.callbacks.non_finite import NonFiniteGuard
from lightning_sae.callbacks.progress import StepProgressBar
from lightning_sae.callbacks.resampling import Resampling
from lightning_sae.callbacks.shrinkage import ShrinkageCorrection
from lightning_sae.callbacks.sparsity_warmup import SparsityWarmup

__all__ = [
    "DeadFeatureTracker",
    "DecoderBiasInit",
    "DecoderNormFolding",
    "DownstreamEval",
    "DuplicatePruning",
    "EncoderBiasCalibration",
    "FeatureRecovery",
    "NonFiniteGuard",
    "Resampling",
    "ShrinkageCorrection",
    "SparsityWarmup",
    "StepProgressBar",
]
