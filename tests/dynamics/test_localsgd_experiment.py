"""`hdopt lab localsgd` at a micro scale: it runs, writes results.json + PNG, and reports a verdict."""

from __future__ import annotations

import json

import torch

from hdopt.distributed import LocalSGDConfig
from hdopt.dynamics.data import load_data
from hdopt.dynamics.experiments.localsgd import EXPERIMENT, Workers, matched_period
from hdopt.dynamics.registry import SCALES, get


def test_localsgd_experiment_writes_results_and_a_verdict(tmp_path):
    assert set(EXPERIMENT.presets) == set(SCALES) and get("localsgd") is EXPERIMENT
    config = EXPERIMENT.config("smoke", n_train=200, workers=2, steps=24, periods=(1, 8), width=8, evals=1,
                               trace_samples=3, lanczos_iters=3, qsr_base=2, qsr_alpha=0.15)
    result = EXPERIMENT.run(config, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "localsgd.png").stat().st_size > 0
    assert saved["verdict"].startswith("localsgd: ") and len(saved["checks"]) == 3
    curves = saved["curves"]
    assert curves["H=1"]["syncs"] == 24 and curves["H=8"]["syncs"] == 3
    qsr_syncs = curves["cosine QSR"]["syncs"]
    assert qsr_syncs < curves["cosine H=2"]["syncs"] == 12
    # the third cosine run: the constant H with at least QSR's synchronizations
    period = matched_period(24, qsr_syncs)
    matched = curves[f"cosine H={period} (QSR's syncs)"]
    assert matched["syncs"] == 24 // period >= qsr_syncs and set(matched["periods"]) == {period}
    assert result.curves["H=8"]["final"]["trace"] > 0
    assert saved["environment"]["threads"] >= 1 and saved["environment"]["cpu_capability"]


def test_matched_period_gives_at_least_as_many_rounds():
    for steps, syncs in [(2048, 382), (6144, 1142), (24, 7), (10, 10), (10, 20)]:
        h = matched_period(steps, syncs)
        assert h >= 1 and (steps // h >= syncs or h == 1)
        assert h == 1 or steps // (h + 1) < syncs  # the largest such period
    assert matched_period(10, 0) == 10  # QSR never synchronized: one round of the whole run


def test_the_measured_model_is_the_workers_average():
    """Sharpness, trace and accuracy are measured on the mean of the workers' weights, mid-round too (when
    the workers differ); the workers are left as they are."""
    config = EXPERIMENT.config("smoke", n_train=100, workers=3, width=8)
    data = load_data(config.data, config.n_train, config.label_noise, config.seed)
    workers = Workers(config, data, LocalSGDConfig(period=4), lr=0.1)
    for _ in range(3):
        workers.step()

    def flat(model):
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    each = [flat(m) for m in workers.models]
    assert not torch.equal(each[0], each[1])
    torch.testing.assert_close(flat(workers.average()), torch.stack(each).mean(0), rtol=0, atol=1e-7)
    assert all(torch.equal(flat(m), e) for m, e in zip(workers.models, each, strict=True))
