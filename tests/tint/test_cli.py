"""``hdopt tint`` through the real entry point."""

from __future__ import annotations

import json

import pytest

from hdopt.cli import main
from hdopt.tint import TinTConfig


def test_size_prints_both_realizations_and_the_reference(capsys):
    """Each printed count is the count of the thing it names: the auxiliary's and its top blocks' from the
    Hugging Face GPT-2 built on the meta device, the explicit TinT's from building it there, the reference's
    from references/tint.md."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from hdopt.tint.explicit import explicit_tint
    from hdopt.tint.size import REFERENCE_COUNTS, SHAPES, meta_spec

    assert main(["tint", "size", "--aux", "gpt2-shape", "--layers", "12", "--steps", "1"]) == 0
    rows = dict(line.strip().rsplit("  ", 1) for line in capsys.readouterr().out.splitlines()[1:])
    printed = {label.strip(): value.strip() for label, value in rows.items()}

    def count(prefix: str) -> int:
        (value,) = [v for k, v in printed.items() if k.startswith(prefix)]
        return int(value.replace(",", ""))

    with torch.device("meta"):
        gpt2 = GPT2LMHeadModel(GPT2Config())  # GPT-2 124M
    assert count("auxiliary parameters") == gpt2.num_parameters()
    assert count("structured: stored") == gpt2.num_parameters()
    assert count("structured: extra per sequence") == sum(p.numel() for p in gpt2.transformer.h.parameters())
    cfg = TinTConfig(n_layers=12, n_steps=1, backward="reference", max_len=1024)
    explicit = explicit_tint(meta_spec(SHAPES["gpt2-shape"]), cfg, device="meta")
    assert count("unpacked explicit, blocks reused") == explicit.num_parameters()
    assert count("unpacked explicit, without reuse") == explicit.num_parameters(reuse=False)
    assert printed["unpacked explicit: state width W / prefix rows"] == (
        f"{explicit.width:,} / {explicit.n_prefix:,}")  # fmt: skip
    reused, unshared = REFERENCE_COUNTS[("gpt2-shape", 12, 1)]
    assert count("reference TinT (tint.md), blocks reused") == reused == 1_476_796_914
    assert count("reference TinT (tint.md), without reuse") == unshared


def test_size_json_for_smollm2(capsys):
    assert main(["tint", "size", "--aux", "smollm2-135m", "--layers", "3", "--steps", "1", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["aux_params"] == 134_515_008  # SmolLM2-135M with tied embeddings
    assert table["structured_per_example"] == 3 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536 + 2 * 576)
    # the Llama explicit construction is built (on the meta device): one prefix row per output row of every
    # linear map (ln1, q|k|v, o, ln2, gate|up, down), the final norm and the vocabulary
    assert table["explicit_kind"] == "built (meta device)"
    assert table["explicit"]["prefix_rows"] == 30 * (4 * 576 + 576 + 2 * 192 + 2 * 1536) + 576 + 49152


def test_bad_arguments_exit_nonzero():
    with pytest.raises(SystemExit):
        main(["tint", "size", "--aux", "gpt5"])


@pytest.mark.integration
def test_eval_on_smollm2(tmp_path, capsys):
    pytest.importorskip("hdopt.lm.models")
    code = main(["tint", "eval", "--aux", "smollm2-135m", "--task", "sst2", "--shots", "2", "--layers", "1",
                 "--steps", "1", "--inner-lr", "1e-4", "--num-eval", "4", "--method", "tint",
                 "--output-dir", str(tmp_path)])
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert 0.0 <= results["tint"]["accuracy"] <= 1.0
    assert json.loads((tmp_path / "config.json").read_text())["tint"]["n_layers"] == 1


def test_size_reports_the_compact_network_and_its_closed_form(capsys):
    assert main(["tint", "size", "--aux", "opt-125m-shape", "--layers", "12", "--steps", "1", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    built, formula = table["compact"], table["compact_formula"]
    assert built["params_reused_with_prefix"] == formula["params_reused_with_prefix"]
    assert built["params_reused_with_prefix"] <= table["reference"][0] == 1_669_324_018


@pytest.mark.parametrize("flags", [["--dtype", "float64"],  # float64 is for the TinT computation only
                                   ["--method", "tint", "--realization", "explicit", "--backward", "exact"]])
def test_eval_refuses_inconsistent_flags_before_loading(flags, capsys):
    assert main(["tint", "eval", "--aux", "no-such-model", *flags]) == 2  # a user error: one line, status 2
    err = capsys.readouterr().err
    assert "--dtype float64 applies" in err or "use --backward reference" in err
    assert "no-such-model" not in err  # refused before the model is looked up


@pytest.mark.integration
def test_eval_explicit_network_agrees_with_the_structured_rule(tmp_path):
    """The compact network's own forward pass on SmolLM2 gives the structured rule's predictions (float64)."""
    code = main(["tint", "eval", "--aux", "smollm2-135m", "--task", "cr", "--shots", "2", "--layers", "1",
                 "--inner-lr", "1e-2", "--num-eval", "3", "--method", "tint", "--realization", "explicit",
                 "--dtype", "float64", "--output-dir", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "results.json").read_text())["tint"]
    assert result["realization"].startswith("explicit") and result["agreement"] == 1.0
    assert result["max_abs_logit_diff"] <= 1e-6  # float64; the rule's finite difference amplifies rounding
