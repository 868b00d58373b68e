"""Activation predictors, the foundation of approximate mode: per FFN, a small model that
guesses from the FFN input which neurons a token will activate, so that only their gate, up and
down rows need to be read (Deja Vu, Liu et al. 2023, arXiv 2310.17157; PowerInfer; ProSparse
Sec. 4 and its appendix on approximate acceleration). The training-free kind is a truncated SVD
of the gate weight (SVDP, arXiv 2603.14110); the trained kind is Deja Vu's low-rank classifier
fitted from it.

* :mod:`.svd` and :mod:`.trained`: the factors of each kind;
* :mod:`.predictor`: the :class:`Predictor` record and its mask;
* :mod:`.calibrate`: :func:`build_predictors`, the cut set to a target recall on text;
* :mod:`.quality`: :func:`measure_predictors`, recall and precision on a text;
* :mod:`.speed`: :func:`time_predictors`, where approximate mode is faster than exact mode;
* :mod:`.storage`: :func:`save_predictors` / :func:`load_predictors`;
* :mod:`.reference`: dense references of the predicted FFN ops;
* :mod:`.gate`: the gate weight a predictor approximates, and its fingerprint.
"""

from .calibrate import build_predictors, cut_for_recall
from .gate import check_gate, gate_fingerprint, gate_weight
from .predictor import (
    Predictor,
    check_predictor,
    estimate,
    low_rank_estimate,
    predicted_active,
    predicted_mask,
)
from .quality import PredictorQuality, measure_predictors
from .reference import predicted_gated_ffn_reference, predicted_plain_ffn_reference
from .speed import predictors_that_pay, time_predictors
from .storage import PredictorFileError, load_predictors, save_predictors
from .svd import svd_factors
from .trained import TrainingConfig, sparsity_at_recall, train_factors

__all__ = [
    "Predictor",
    "PredictorFileError",
    "PredictorQuality",
    "TrainingConfig",
    "build_predictors",
    "check_gate",
    "check_predictor",
    "cut_for_recall",
    "estimate",
    "gate_fingerprint",
    "gate_weight",
    "load_predictors",
    "low_rank_estimate",
    "measure_predictors",
    "predicted_active",
    "predicted_gated_ffn_reference",
    "predicted_mask",
    "predicted_plain_ffn_reference",
    "predictors_that_pay",
    "save_predictors",
    "sparsity_at_recall",
    "svd_factors",
    "time_predictors",
    "train_factors",
]
