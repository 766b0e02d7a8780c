"""hdopt.dynamics: measuring and demonstrating the implicit bias of training.

Tools (usable on any torch model): weight norms and angular updates (:mod:`.norms`), scale-invariance
detection (:mod:`.invariance`), Hessian sharpness / trace by Lanczos and Hutchinson (:mod:`.hessian`),
gradient noise scale (:mod:`.noise_scale`), batch-size scaling rules (:mod:`.hparams`), SVAG (:mod:`.svag`),
the weight-decay-equivalent exponential lr (:mod:`.explr`), normalized GD and GD on sqrt(L) (:mod:`.optim`),
reparametrization = mirror descent (:mod:`.mirror`), data loaders (:mod:`.data`).
Experiments: ``hdopt lab <name>`` or :func:`hdopt.dynamics.registry.get`.
"""

from hdopt.dynamics.data import (
    TensorData,
    add_label_noise,
    load_data,
    load_digits,
    load_fashion_mnist,
    read_idx,
)
from hdopt.dynamics.explr import explr_alpha, explr_factor, make_explr_sgd
from hdopt.dynamics.hessian import (
    CurvatureMonitor,
    HessianOperator,
    hessian_trace,
    hutchinson_trace,
    lanczos,
    power_iteration,
    sharpness,
)
from hdopt.dynamics.hparams import scale_hparams
from hdopt.dynamics.invariance import check_scale_invariance, find_scale_invariant, scale_invariant_parameters
from hdopt.dynamics.noise_scale import gradient_noise_scale, per_sample_grads
from hdopt.dynamics.norms import NormMonitor, angular_update, effective_lr, intrinsic_lr, weight_norm
from hdopt.dynamics.optim import NormalizedGD, SqrtLossGD
from hdopt.dynamics.svag import SVAG, svag_coefficients

__all__ = [
    "CurvatureMonitor", "HessianOperator", "NormMonitor", "NormalizedGD", "SVAG", "SqrtLossGD", "TensorData",
    "add_label_noise",
    "angular_update", "check_scale_invariance", "effective_lr", "explr_alpha", "explr_factor",
    "find_scale_invariant", "gradient_noise_scale", "hessian_trace", "hutchinson_trace", "intrinsic_lr",
    "lanczos", "load_data", "load_digits", "load_fashion_mnist", "make_explr_sgd", "per_sample_grads",
    "power_iteration", "read_idx", "scale_hparams", "scale_invariant_parameters", "sharpness",
    "svag_coefficients", "weight_norm",
]
