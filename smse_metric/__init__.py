"""smse-metric: fast, exact, GPU-friendly metric learning for multi-magnification histopathology.

Examples:
    >>> import torch
    >>> from smse_metric import TripletMarginLoss, TripletMiner
    >>> emb = torch.nn.functional.normalize(torch.randn(32, 16), dim=1).requires_grad_()
    >>> labels = torch.arange(32) % 4
    >>> loss = TripletMarginLoss(margin=0.2, triplets="semihard")(emb, labels)
    >>> loss.backward()
"""

from . import functional
from .evaluation import (
    EvaluationReport,
    FaissIndex,
    KNNClassifier,
    TorchIndex,
    evaluate_embeddings,
    evaluate_predictions,
    make_index,
)
from .losses import ContrastiveLoss, FocalLoss, ReinforcedFocalLoss, TripletMarginLoss
from .miners import PairMiner, TripletMiner
from .samplers import MultiScaleBatchSampler, SamplerStats

__version__ = "0.1.0"

__all__ = [
    "ContrastiveLoss",
    "EvaluationReport",
    "FaissIndex",
    "FocalLoss",
    "KNNClassifier",
    "MultiScaleBatchSampler",
    "PairMiner",
    "ReinforcedFocalLoss",
    "SamplerStats",
    "TorchIndex",
    "TripletMarginLoss",
    "TripletMiner",
    "__version__",
    "evaluate_embeddings",
    "evaluate_predictions",
    "functional",
    "make_index",
]
