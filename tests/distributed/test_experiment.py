"""`hdopt lab localsgd` at a micro scale: it runs, writes results.json + PNG, and reports a verdict."""

from __future__ import annotations

import json

from hdopt.distributed.experiment import EXPERIMENT
from hdopt.dynamics.registry import SCALES


def test_localsgd_experiment_writes_results_and_a_verdict(tmp_path):
    assert set(EXPERIMENT.presets) == set(SCALES)
    config = EXPERIMENT.config("smoke", n_train=200, workers=2, steps=24, periods=(1, 8), width=8, evals=1,
                               trace_samples=3, lanczos_iters=3, qsr_base=2, qsr_alpha=0.15)
    result = EXPERIMENT.run(config, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "localsgd.png").stat().st_size > 0
    assert saved["verdict"].startswith("localsgd: ") and len(saved["checks"]) == 4
    curves = saved["curves"]
    assert curves["H=1"]["syncs"] == 24 and curves["H=8"]["syncs"] == 3
    assert curves["cosine QSR"]["syncs"] < curves["cosine H=2"]["syncs"] == 12
    assert result.curves["H=8"]["final"]["trace"] > 0
