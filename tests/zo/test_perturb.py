import copy
import warnings

import pytest
import torch
from torch import nn

from hdopt.zo.noise import NoiseGenerator, derive_key, name_id, noise
from hdopt.zo.perturb import ParamSlot, Perturbation

from .models import TinyLM, batch, bitwise_equal, snapshot


def _slots(model):
    return {id(p): ParamSlot(p, name_id(n)) for n, p in model.named_parameters()}


def _explicitly_perturbed(model, terms, dist="gaussian"):
    """A deep copy whose weights are written as theta + sum c z, tensor by tensor."""
    twin = copy.deepcopy(model)
    gen = NoiseGenerator(dist)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            z_sum = torch.zeros(p.numel(), dtype=torch.float64)
            for direction, coef in terms:
                z_sum += coef * gen.generate(derive_key(direction, name_id(name)), 0, p.numel()).double()
            p.copy_((p.double().view(-1) + z_sum).view_as(p))
    return twin


@pytest.mark.parametrize("chunk", [64, 1 << 20], ids=["row-blocked head", "whole copies"])
def test_forward_perturbation_equals_explicitly_perturbed_weights(chunk):
    model, ids = TinyLM(dtype=torch.float64), batch()
    model.head.bias = nn.Parameter(torch.randn(40, dtype=torch.float64))  # a trainable bias on the head too
    terms = [(derive_key(5, 0), 1e-2), (derive_key(5, 1), -3e-3)]
    generator = NoiseGenerator("gaussian", chunk=chunk)
    with torch.no_grad(), Perturbation(_slots(model), terms, generator) as pert:
        hooked = model.loss(ids)
    explicit = _explicitly_perturbed(model, terms).loss(ids)
    assert model.head.weight is model.embed.weight and model.head.weight.shape == (40, 16)
    unperturbed = model.loss(ids)
    assert abs(hooked.item() - explicit.item()) < 1e-12
    assert abs(hooked.item() - unperturbed.item()) > 1e-4  # the perturbation did something
    assert pert.seen == {id(p) for p in model.parameters()}


def test_weights_are_untouched_during_and_after_perturbation():
    model, ids = TinyLM(), batch()
    before = snapshot(model)
    seen_inside = {}

    def spy(module, args, output):
        seen_inside[module] = module.hidden.weight if hasattr(module, "hidden") else None

    with torch.no_grad(), Perturbation(_slots(model), [(1, 0.5)], NoiseGenerator("rademacher")):
        model.loss(ids)
        assert bitwise_equal(before, snapshot(model))
    assert bitwise_equal(before, snapshot(model))
    assert isinstance(model.hidden._parameters["weight"], nn.Parameter)


def test_a_forward_that_raises_still_restores_the_parameters():
    model = TinyLM()
    originals = dict(model.hidden._parameters)

    class Boom(RuntimeError):
        pass

    def explode(module, args, output):
        raise Boom

    handle = model.norm.register_forward_hook(explode)
    try:
        with torch.no_grad(), Perturbation(_slots(model), [(1, 0.5)], NoiseGenerator()):
            model.loss(batch())
    except Boom:
        pass
    finally:
        handle.remove()
    assert all(model.hidden._parameters[k] is v for k, v in originals.items())


def test_inplace_mode_restores_bitwise():
    w = torch.randn(1000, dtype=torch.bfloat16)
    before = w.clone()
    slots = {id(w): ParamSlot(w, 7)}
    with Perturbation(slots, [(3, 1e-3)], NoiseGenerator(), inplace_ids=frozenset(slots)) as pert:
        assert not torch.equal(w, before)
    assert torch.equal(w.view(torch.int16), before.view(torch.int16))
    assert pert.seen == {id(w)}


def test_no_hooks_leak_after_exit():
    hooks_before = len(nn.modules.module._global_forward_pre_hooks)
    with warnings.catch_warnings(), Perturbation(_slots(TinyLM()), [(1, 0.1)], NoiseGenerator()):
        assert len(nn.modules.module._global_forward_pre_hooks) == hooks_before + 1
    assert len(nn.modules.module._global_forward_pre_hooks) == hooks_before


def test_large_linear_at_few_positions_is_computed_in_row_blocks():
    torch.manual_seed(0)
    head = nn.Linear(16, 40).double()  # 640 weights > chunk 64 and > the 2 x 40 outputs: row blocks
    x = torch.randn(2, 16, dtype=torch.float64)
    slots = {id(p): ParamSlot(p, name_id(n)) for n, p in head.named_parameters()}
    terms = [(derive_key(9), 1e-2)]
    generator = NoiseGenerator("gaussian", chunk=64)
    blocks = []
    original = Perturbation._blocked_linear

    def spy(self, *args):
        blocks.append(True)
        return original(self, *args)

    Perturbation._blocked_linear = spy
    try:
        with torch.no_grad(), Perturbation(slots, terms, generator):
            hooked = head(x)
    finally:
        Perturbation._blocked_linear = original
    z = {n: noise(derive_key(terms[0][0], name_id(n)), 0, p.numel()) for n, p in head.named_parameters()}
    weight = head.weight + 1e-2 * z["weight"].double().view(40, 16)
    bias = head.bias + 1e-2 * z["bias"].double()
    assert blocks == [True]
    assert torch.allclose(hooked, nn.functional.linear(x, weight, bias), rtol=0, atol=1e-12)
    assert head.weight.shape == (40, 16) and isinstance(head.weight, nn.Parameter)
