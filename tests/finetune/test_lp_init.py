"""``--lp-init``: the linear probe written into the LM head's label-word rows is exactly the probe's
classifier, on the features the adapted model computes; runs started from it resume, replay and reload."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from hdopt.finetune import finetune, get_method, resume, rundir
from hdopt.finetune.adapters import prepare_model
from hdopt.finetune.checkpoint import load_checkpoint
from hdopt.finetune.cli_compare import row
from hdopt.finetune.config import ConfigError, MethodConfig
from hdopt.finetune.data_parallel import check_data_parallel
from hdopt.finetune.label_head import (
    apply_label_head,
    fit_label_head,
    fit_probe,
    head_inputs,
    label_token_ids,
    load_label_head,
)
from hdopt.finetune.replay import compare_with_checkpoint, rebuild
from hdopt.finetune.trained import load_trained, run_config
from hdopt.finetune.trainer import evaluate_examples, load_data
from hdopt.lm.scoring import encode_examples, option_scores, scores_by_example
from hdopt.lm.tasks import resolve_task
from tests.finetune.conftest import _write_task, make_model, toy_config


@pytest.fixture(scope="session")
def letter_task(tmp_path_factory):
    """``letters``: like ``toy`` but with one-token label words for the byte tokenizer ('N' / 'Y')."""
    folder = tmp_path_factory.mktemp("letters")
    words = ["cat", "dog", "sun", "map", "cup", "pen", "box", "hat", "owl", "fig"]
    texts = [f"{'good' if i % 2 else 'bad'} {words[i % 10]} {words[(3 * i) % 10]}" for i in range(80)]
    rows = [{"text": text, "label": str(i % 2)} for i, text in enumerate(texts)]
    return _write_task(folder, "letters", rows, 60,
                       "template: '{text}:'\nlabel_column: label\nlabel_words: {'0': 'N', '1': 'Y'}\n")


def _splits(task_file, **overrides):
    cfg = toy_config(task_file, "unused", "mezo", num_train=32, num_dev=12, num_eval=16, **overrides)
    return cfg, resolve_task(str(task_file)), load_data(cfg, resolve_task(str(task_file)))


# -- the probe -----------------------------------------------------------------------------------------------
def test_binary_probe_scores_are_sklearns_decision_function():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 6)) * [1, 2, 3, 0.5, 4, 1] + [0, 1, 0, 5, 0, 0]
    y = (x[:, 0] + 0.3 * x[:, 2] + rng.normal(scale=0.5, size=80) > 0).astype(int)
    weights, c, train_acc, dev = fit_probe(x, y, None, None, 2, c=0.1)
    scale = x.std(axis=0) + 1e-6
    reference = LogisticRegression(C=0.1, fit_intercept=False, max_iter=5000).fit(x / scale, y)
    scores = x @ weights.T
    np.testing.assert_allclose(scores[:, 1] - scores[:, 0], reference.decision_function(x / scale), rtol=1e-9)
    np.testing.assert_allclose(weights[0], -weights[1])  # the least-change split of one score difference
    assert (c, dev) == (0.1, None)
    assert train_acc == round(100 * np.mean(reference.predict(x / scale) == y), 2)


def test_multiclass_probe_and_the_choice_of_c():
    rng = np.random.default_rng(1)
    centers = rng.normal(scale=3, size=(3, 5))
    y = rng.integers(0, 3, size=120)
    x = centers[y] + rng.normal(size=(120, 5))
    weights, c, _, dev = fit_probe(x[:90], y[:90], x[90:], y[90:], 3)
    scale = x[:90].std(axis=0) + 1e-6
    accuracies = {
        g: np.mean(LogisticRegression(C=g, fit_intercept=False, max_iter=5000).fit(x[:90] / scale, y[:90])
                   .predict(x[90:] / scale) == y[90:])
        for g in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
    }  # fmt: skip
    best = max(accuracies.values())
    assert c == min(g for g, a in accuracies.items() if a == best)  # best dev, ties to the smaller C
    assert dev == round(100 * best, 2)
    reference = LogisticRegression(C=c, fit_intercept=False, max_iter=5000).fit(x[:90] / scale, y[:90])
    assert np.array_equal(np.argmax(x @ weights.T, axis=1), reference.predict(x / scale))
    assert fit_probe(x[:90], y[:90], None, None, 3)[1] in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)  # CV


def test_one_class_is_refused():
    with pytest.raises(ValueError, match="two classes"):
        fit_probe(np.ones((4, 3)), np.zeros(4, dtype=int), None, None, 2, c=1.0)


# -- writing it into the head --------------------------------------------------------------------------------
def test_label_words_must_be_single_distinct_tokens(task_file, choice_task, letter_task, tokenizer):
    assert label_token_ids(tokenizer, resolve_task(str(letter_task))) == tokenizer(
        "NY", add_special_tokens=False).input_ids  # fmt: skip
    with pytest.raises(ValueError, match="is 3 tokens"):  # ' no' with a byte tokenizer
        label_token_ids(tokenizer, resolve_task(str(task_file)))
    with pytest.raises(ValueError, match="has none"):
        label_token_ids(tokenizer, resolve_task(str(choice_task)))


@pytest.mark.parametrize(("family", "adapter"), [("llama-tied", "full"), ("llama-tied", "prefix"),
                                                  ("gpt2", "prefix"), ("opt", "lora"), ("llama", "full")])
def test_the_head_computes_the_probes_scores(family, adapter, letter_task, tokenizer):
    cfg, task, splits = _splits(letter_task)
    torch.manual_seed(0)
    model = prepare_model(make_model(family), adapter, MethodConfig(), seed=0)
    embed_before = model.get_input_embeddings().weight.detach().clone()
    head_before = model.get_output_embeddings().weight.detach().clone()
    label_head = fit_label_head(model, tokenizer, task, splits.train, splits.dev, 32, c=0.3)
    apply_label_head(model, label_head)

    ids = label_head.token_ids
    head = model.get_output_embeddings().weight.detach()
    assert torch.equal(model.get_input_embeddings().weight, embed_before)  # untied first
    others = torch.ones(head.shape[0], dtype=torch.bool)
    others[ids] = False
    assert torch.equal(head[others], head_before[others]) and not torch.equal(head[ids], head_before[ids])

    # the model's option scores are the probe's scores on its own features, up to a per-example constant
    x = head_inputs(model, tokenizer, splits.eval, 32)
    train_y = np.array([e.label for e in splits.train])
    weights = fit_probe(head_inputs(model, tokenizer, splits.train, 32), train_y, None, None, 2, c=0.3)[0]
    probe_margin = (x @ weights.T) @ np.array([-1.0, 1.0])
    batch = encode_examples(tokenizer, splits.eval, 32)
    model.eval()  # GPT-2 and OPT have dropout
    with torch.no_grad():
        table = scores_by_example(batch, option_scores(model, batch)).double().numpy()
    model_margin = table[:, 1] - table[:, 0]
    np.testing.assert_allclose(model_margin, probe_margin, rtol=1e-4, atol=1e-4 * np.abs(probe_margin).max())
    result = evaluate_examples(model, tokenizer, task, cfg, splits.dev)
    assert result.metrics["accuracy"] == label_head.dev_accuracy


# -- runs ----------------------------------------------------------------------------------------------------
class Killed(Exception):
    pass


@pytest.mark.parametrize("method", ["mezo-prefix", "mezo"])
def test_an_lp_init_run_resumes_replays_and_reloads(method, letter_task, tokenizer, tmp_path):
    def run(folder, **kwargs):
        cfg = toy_config(letter_task, folder, method, lp_init=True, lr=1e-3, eps=1e-2, steps=6, eval_every=2)
        return finetune(cfg, make_model("llama-tied"), tokenizer, **kwargs)

    def kill_at_3(step: int) -> None:
        if step == 3:
            raise Killed

    full, folder = run(tmp_path / "full")
    saved = load_label_head(folder / rundir.LP_HEAD)
    assert full["lp_init"] == saved.meta()
    assert row(folder)["method"] == f"{method} (LP init)"  # hdopt compare names the start
    first_dev = [r for r in rundir.read_metrics(folder) if "dev_accuracy" in r][0]
    assert first_dev["step"] == 0 and first_dev["dev_accuracy"] == saved.dev_accuracy  # starts at the probe

    with pytest.raises(Killed):
        run(tmp_path / "killed", on_step=kill_at_3)
    resumed, _ = resume(tmp_path / "killed", make_model("llama-tied"), tokenizer)
    a = load_checkpoint(tmp_path / "full" / rundir.CHECKPOINT)[0]
    b = load_checkpoint(tmp_path / "killed" / rundir.CHECKPOINT)[0]
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test"] == full["test"] and resumed["lp_init"] == full["lp_init"]

    _, params, steps = rebuild(folder, make_model("llama-tied"), tokenizer)
    assert steps == 6 and compare_with_checkpoint(params, folder / rundir.CHECKPOINT) == (True, 0.0)

    model, _ = load_trained(folder, make_model("llama-tied"), tokenizer)
    cfg = run_config(folder)
    task = resolve_task(cfg.data.task)
    test = evaluate_examples(model, tokenizer, task, cfg, load_data(cfg, task).eval)
    assert test.metrics["accuracy"] == full["test"]


def test_lp_init_is_refused_where_it_cannot_apply(task_file, letter_task, tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="lp is the probe itself"):
        finetune(toy_config(letter_task, tmp_path / "a", "lp", lp_init=True), make_model("llama"), tokenizer)
    with pytest.raises(ValueError, match="tokens for this tokenizer"):
        finetune(toy_config(task_file, tmp_path / "b", "mezo", lp_init=True), make_model("llama"), tokenizer)
    with pytest.raises(ConfigError, match="lp_c must be > 0"):
        MethodConfig(lp_c=0.0)
    cfg = toy_config(letter_task, tmp_path / "c", "mezo", lp_init=True, batch_size=8)
    with pytest.raises(ConfigError, match="not supported on 2 processes"):
        check_data_parallel(cfg, get_method("mezo"), world_size=2)
