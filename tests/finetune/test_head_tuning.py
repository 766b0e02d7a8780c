"""``lp`` on tasks without label words is MeZO's head tuning: only the (untied) LM head trains, with backprop;
the run folder holds the head, resumes bitwise and reloads to the same evaluation."""

from __future__ import annotations

import json

import pytest
import torch

from hdopt.finetune import finetune, get_method, resume, rundir
from hdopt.finetune.batches import make_closure
from hdopt.finetune.checkpoint import load_checkpoint
from hdopt.finetune.head import add_head, is_tied, untie_head
from hdopt.finetune.methods import HEAD_TUNING
from hdopt.finetune.trained import load_trained, run_config
from hdopt.finetune.trainer import LoopState, evaluate_examples, load_data, resolve, setup, train_loop
from hdopt.lm.tasks import resolve_task
from tests.finetune.conftest import make_model, toy_config

TIED = ("llama-tied", "gpt2", "opt", "gemma3")
HEAD = "lm_head.weight"


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lp_is_head_tuning_on_tasks_without_label_words(task_file, choice_task, qa_task):
    lp = get_method("lp")
    assert lp.for_task(resolve_task(str(task_file))) is lp  # label words: the logistic-regression probe
    for path in (choice_task, qa_task):
        method = lp.for_task(resolve_task(str(path)))
        assert method is HEAD_TUNING and (method.name, method.trainer, method.adapter) == ("lp", "fo", "head")
    cfg = resolve(toy_config(choice_task, "out", "lp", steps=None, eval_every=None, batch_size=None),
                  HEAD_TUNING, resolve_task(str(choice_task)))  # fmt: skip
    assert (cfg.method.optimizer, cfg.optim.lr, cfg.optim.schedule) == ("adamw", 1e-4, "linear")
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.eval_every) == (625, 8, 125)
    assert cfg.replace(lr=3e-3).optim.lr == 3e-3  # overridable like any default


@pytest.mark.parametrize("family", TIED)
def test_untying_keeps_the_logits_and_separates_the_head(family):
    model = make_model(family)
    ids = torch.randint(3, 200, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    assert is_tied(model)
    untie_head(model)
    assert not is_tied(model) and model.config.tie_word_embeddings is False
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert torch.equal(embed, head)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
        head.add_(1.0)
    assert not torch.equal(embed, head)  # the input embedding did not move with the head


def test_an_untied_head_is_left_as_it_is():
    model = make_model("llama")
    head = model.get_output_embeddings().weight
    add_head(model)
    assert model.get_output_embeddings().weight is head and not is_tied(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [HEAD]


def _train_set_loss(s) -> float:
    closure = make_closure(s.model, s.tokenizer, s.task, s.splits.train, "loss", 32, s.device)
    with torch.no_grad():
        return float(closure())


@pytest.mark.parametrize("family", ["llama-tied", "gpt2", "llama"])
@pytest.mark.parametrize("task", ["choice_task", "qa_task"])
def test_head_tuning_lowers_the_loss_and_changes_only_the_head(task, family, tokenizer, tmp_path, request):
    model = make_model(family)
    before = _snapshot(model)  # tied families: the shared matrix appears under both names
    cfg = toy_config(request.getfixturevalue(task), tmp_path, "lp", steps=8, eval_every=0, keep_best=False,
                     lr=1e-2, num_dev=4, num_eval=4)  # fmt: skip
    s = setup(cfg, model, tokenizer)
    assert [n for n, _ in s.params] == [HEAD] and s.method is HEAD_TUNING
    start = _train_set_loss(s)
    assert train_loop(s, LoopState(), tmp_path, rundir.MetricsLog(tmp_path)) == "completed"
    assert not s.model.training  # frozen features: no dropout in the body while the head trains
    after = _snapshot(s.model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before if k != HEAD)  # body + input embedding
    assert not torch.equal(after[HEAD], before[HEAD])
    assert _train_set_loss(s) < start - 0.5


@pytest.mark.parametrize("task, keep_best", [("choice_task", True), ("qa_task", False)])
def test_head_tuning_run_reloads_to_the_same_evaluation(task, keep_best, tokenizer, tmp_path, request):
    """The test split, evaluated again on the starting model with the run's head loaded (best.safetensors,
    or the last checkpoint without keep_best), gives the run's test metrics exactly."""
    cfg = toy_config(request.getfixturevalue(task), tmp_path, "lp", steps=4, eval_every=2, lr=1e-2,
                     num_dev=4, num_eval=6, keep_best=keep_best)  # fmt: skip
    results, folder = finetune(cfg, make_model("llama-tied"), tokenizer)
    assert results["status"] == "completed" and results["method"] == "lp" and results["backwards"] == 4
    assert results["trainable_parameters"] == make_model("llama-tied").get_output_embeddings().weight.numel()
    record = json.loads((folder / rundir.CONFIG).read_text())["method_record"]
    assert (record["trainer"], record["adapter"]) == ("fo", "head")
    kept = folder / (rundir.BEST if keep_best else rundir.CHECKPOINT)
    assert list(load_checkpoint(kept)[0]) == [HEAD]  # the head is all a run keeps of the model
    if keep_best:
        assert results["best_step"] > 0  # the kept head is a trained one (dev accuracy rose)
    model, _ = load_trained(folder, make_model("llama-tied"), tokenizer)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert torch.equal(embed, make_model("llama-tied").get_input_embeddings().weight)
    assert not torch.equal(head, embed)
    saved = run_config(folder)
    task_ = resolve_task(saved.data.task)
    again = evaluate_examples(model, tokenizer, task_, saved, load_data(saved, task_).eval).metrics
    assert again[task_.metric] == results["test"]
    assert all(again[k] == results[f"test_{k}"] for k in again)


class Killed(Exception):
    """Stands in for SIGKILL."""


def test_head_tuning_resumes_bitwise(choice_task, tokenizer, tmp_path):
    def run(folder, **kwargs):
        cfg = toy_config(choice_task, folder, "lp", steps=6, eval_every=2, lr=1e-2, num_dev=4, num_eval=4)
        return finetune(cfg, make_model("gpt2"), tokenizer, **kwargs)

    def kill_at_5(step: int) -> None:
        if step == 5:
            raise Killed

    full, _ = run(tmp_path / "full")
    with pytest.raises(Killed):
        run(tmp_path / "killed", on_step=kill_at_5)
    resumed, _ = resume(tmp_path / "killed", make_model("gpt2"), tokenizer)
    for name in (rundir.CHECKPOINT, rundir.BEST):
        a, b = load_checkpoint(tmp_path / "full" / name)[0], load_checkpoint(tmp_path / "killed" / name)[0]
        assert list(a) == [HEAD] and torch.equal(a[HEAD], b[HEAD])
    assert resumed["test"] == full["test"] and resumed["best_step"] == full["best_step"]


def test_label_word_tasks_keep_the_logistic_regression_probe(task_file, tokenizer, tmp_path):
    cfg = toy_config(task_file, tmp_path, "lp", steps=None, eval_every=None)
    results, folder = finetune(cfg, make_model("llama-tied"), tokenizer)
    assert results["steps"] == 0 and results["backwards"] == 0
    assert sorted(load_checkpoint(folder / rundir.BEST)[0]) == ["coef"]
    with pytest.raises(ValueError, match="logistic-regression probe"):
        load_trained(folder, make_model("llama-tied"), tokenizer)


def test_head_tuning_is_refused_under_torchrun(choice_task):
    from hdopt.finetune import ConfigError
    from hdopt.finetune.data_parallel import check_data_parallel

    cfg = toy_config(choice_task, "out", "lp")
    with pytest.raises(ConfigError, match="'lp' trains with backprop"):
        check_data_parallel(cfg, HEAD_TUNING, world_size=2)
