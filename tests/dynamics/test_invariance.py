"""Scale-invariance detection: structure (torch.fx) and the numerical check."""

import torch

from hdopt.dynamics.invariance import check_scale_invariance, find_scale_invariant, scale_invariant_parameters
from hdopt.dynamics.models import relu_mlp, scale_invariant_mlp

X = torch.randn(32, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def forward(model):
    return model(X)


def test_bn_mlp_weights_are_found_and_exactly_invariant():
    model = scale_invariant_mlp(8, 16, 4, depth=2, eps=1e-30, dtype=torch.float64)
    names = find_scale_invariant(model)
    assert names == ["0.weight", "3.weight", "6.weight"]
    deviations = check_scale_invariance(model, forward, names)
    assert max(deviations.values()) < 1e-12
    assert scale_invariant_parameters(model, forward) == names


def test_plain_mlp_has_no_invariant_weights_and_the_check_says_so():
    model = relu_mlp(8, 16, 4, dtype=torch.float64)
    assert find_scale_invariant(model) == []
    deviations = check_scale_invariance(model, forward)
    assert min(deviations.values()) > 1e-3


def test_check_restores_the_model():
    model = scale_invariant_mlp(8, 16, 4, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_scale_invariance(model, forward)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_weight_followed_by_norm_but_with_bias_is_not_a_candidate_under_layernorm():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8),
                                torch.nn.Linear(8, 2, bias=False),
                                torch.nn.LayerNorm(2, eps=1e-12))
    assert find_scale_invariant(model) == ["2.weight"]
    assert scale_invariant_parameters(model.double(), forward) == ["2.weight"]
