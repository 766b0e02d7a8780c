"""Curated deliberate bugs (mutants) on hdopt's headline paths, each run against the fast tests that must
catch it.

A mutant is a realistic bug a careless change could introduce: an exact snippet of ``src/`` that must occur
exactly once (the run stops before anything else when one moved), its replacement, one line saying what the
bug is, and the pytest node ids that should fail because of it. For each mutant the script

1. copies ``src/`` into a fresh temporary folder (the working tree is only ever read, so an interrupted
   run cannot leave a mutant behind), applies the replacement there, and
2. runs the mutant's tests from the repository root with ``PYTHONPATH`` at the copy (subprocesses the tests
   start, torchrun workers included, import the copy too): failed tests = caught, all passed = escaped.

Before any mutant, every test the mutants name runs once on an unmutated copy (one pytest run) and must pass
with nothing skipped: a mutant "caught" by a test that already fails proves nothing. A mutant's own run stops
at its first failing test; a run that hangs past ``--timeout`` counts as caught. Then the script prints a
table and the total, and a full run writes benchmarks/results/mutants.json (atomically, hdopt.io).

    PYTHONPATH=src python scripts/mutants.py                 # all (about 6 min on 2 shared cores)
    PYTHONPATH=src python scripts/mutants.py --list          # ids, files, bugs, tests
    PYTHONPATH=src python scripts/mutants.py --only zo-sign,tint-x4-bias   # a few (no results file)

Exit status: 0 every mutant caught, 1 some escaped, 2 a snippet moved or a baseline failed. An escaped
mutant is a finding: strengthen or add the test that should catch it, never delete the mutant. How to add
one: CONTRIBUTING.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "mutants.json"


@dataclass(frozen=True)
class Mutant:
    """One deliberate bug: ``original`` (exactly once in ``path``) becomes ``replacement``."""

    id: str
    path: str  # relative to the repository root
    original: str
    replacement: str
    description: str
    tests: tuple[str, ...]  # pytest node ids, relative to the repository root


ZO, ZT, ZP = "tests/zo/test_optim.py::", "tests/zo/test_contract.py::", "tests/zo/test_perturb.py::"
VERDICTS = "tests/report/test_verdicts.py::"
GROUPS = ZT + "test_each_group_is_perturbed_and_updated_with_its_own_eps"
READ = "tests/finetune/test_read_adapters.py::"

MUTANTS: tuple[Mutant, ...] = (
    # -- the ZO update -------------------------------------------------------------------------------------
    Mutant("zo-sign", "src/hdopt/zo/optim.py",
           "w32[at : at + z.numel()].add_(z, alpha=-lr * coef)",
           "w32[at : at + z.numel()].add_(z, alpha=lr * coef)",
           "ZO-SGD steps along +ghat (the update's sign flipped)",
           (GROUPS, ZO + "test_every_rule_lowers_the_loss_of_a_tiny_lm[ZOSGD]")),
    Mutant("zo-group-lr", "src/hdopt/zo/base.py",
           'lrs=tuple(float(g["lr"]) for g in self.param_groups),',
           'lrs=tuple(float(self.param_groups[0]["lr"]) for g in self.param_groups),',
           "every param group is updated with the first group's learning rate",
           (ZT + "test_each_group_is_updated_with_its_own_lr",)),
    Mutant("zo-eps-ratio", "src/hdopt/zo/trajectory.py",
           "return [[self.scale * g * (eps[0] / e) / q for g in self.grads] for e in eps]",
           "return [[self.scale * g * (e / eps[0]) / q for g in self.grads] for e in eps]",
           "a group's coefficient uses eps_g / eps_1 instead of eps_1 / eps_g",
           (GROUPS,)),
    Mutant("zo-momentum", "src/hdopt/zo/optim.py",
           'buf.mul_(group["momentum"]).add_(self.noise_sum(slot, terms, start, length, directions, w32))',
           'buf.mul_(group["momentum"]).add_(self.noise_sum(slot, terms, start, length, directions, w32), '
           'alpha=1 - group["momentum"])',
           "ZO-SGD momentum damps the new estimate by (1 - mu): an average, not heavy-ball",
           (ZT + "test_momentum_is_heavy_ball_on_the_estimate",)),
    # -- exact restore and the noise ------------------------------------------------------------------------
    Mutant("restore-inplace", "src/hdopt/zo/perturb.py",
           "        for tensor, backup in self._backups:\n            tensor.copy_(backup)\n",
           "",
           "leaving a perturbation drops the in-place backups without copying them back",
           (ZP + "test_inplace_mode_restores_bitwise",
            ZO + "test_inplace_restore_is_exact_where_the_reference_round_trip_drifts[dtype0]")),
    Mutant("restore-forward", "src/hdopt/zo/perturb.py",
           "            for name, param in entry[1].pop():\n"
           "                module._parameters[name] = param\n",
           "            entry[1].pop()\n",
           "a module keeps its perturbed copies after its forward (the swap is not undone)",
           (ZP + "test_weights_are_untouched_during_and_after_perturbation",)),
    Mutant("noise-param-key", "src/hdopt/zo/perturb.py",
           "return derive_key(direction_key, self.ident)",
           "return derive_key(self.ident, direction_key)",
           "a parameter's noise key mixes its parts the other way round (old runs stop replaying)",
           (GROUPS, ZP + "test_forward_perturbation_equals_explicitly_perturbed_weights[whole copies]")),
    Mutant("noise-step-key", "src/hdopt/zo/base.py",
           "return derive_key(self.seed, self.step_count if step is None else step)",
           "return derive_key(self.seed, step or 0)",
           "the next step's key ignores the step count: every step draws the same directions",
           (ZO + "test_estimates_are_unbiased_on_a_quadratic[central-1-gaussian]",)),
    # -- trajectory, replay, state_dict ---------------------------------------------------------------------
    Mutant("replay-scale", "src/hdopt/zo/trajectory.py",
           "records.append(UpdateRecord(step, key, tuple(grads), tuple(lrs), scale, rec_eps,",
           "records.append(UpdateRecord(step, key, tuple(grads), tuple(lrs), 1.0, rec_eps,",
           "a loaded trajectory ignores each record's scale (ZOConservative's choice of +1, -1 or 0)",
           (ZO + "test_replay_rebuilds_the_weights_bitwise[ZOConservative]",)),
    Mutant("state-trajectory-not-saved", "src/hdopt/zo/base.py",
           'zo["trajectory"] = torch.frombuffer(bytearray(body), dtype=torch.uint8) if body else empty',
           'zo["trajectory"] = empty',
           "state_dict() leaves the trajectory out",
           (ZT + "test_state_dict_through_torch_save_continues_and_replays_bitwise[ZOSGD]",)),
    Mutant("state-trajectory-not-loaded", "src/hdopt/zo/base.py",
           "        self.trajectory = trajectory\n        self._directions.clear()\n",
           "        self._directions.clear()\n",
           "load_state_dict() checks the saved trajectory but keeps the empty one",
           (ZT + "test_state_dict_through_torch_save_continues_and_replays_bitwise[ZOSGD]",)),
    # -- resume in the trainer (small snippets: the trainer is still changing) -----------------------------
    Mutant("resume-rng", "src/hdopt/finetune/trainer.py",
           '    torch.set_rng_state(training["rng"])\n',
           "",
           "resume does not restore the RNG state (dropout masks differ after a resume)",
           ("tests/finetune/test_resume.py::test_resume_after_kill_is_bitwise_identical[ft]",)),
    Mutant("resume-loop-state", "src/hdopt/finetune/trainer.py",
           'state = LoopState(**training["loop"])',
           'state = LoopState(step=training["loop"]["step"])',
           "resume restores the step but not the rest of the loop state (pass counts, best dev score)",
           ("tests/finetune/test_resume.py::test_resume_after_kill_is_bitwise_identical[ft]",)),
    # -- Local SGD averaging -------------------------------------------------------------------------------
    Mutant("localsgd-one-replica", "src/hdopt/distributed/averaging.py",
           "            for replica in per_replica[1:]:\n"
           "                flat.add_(torch.cat([replica[i].reshape(-1) for i in idx]))\n"
           '            self.comm.all_reduce_sum_(flat, f"{what} ({dtype})")\n'
           "            if dtype.is_floating_point or dtype.is_complex:\n"
           "                flat.div_(count)\n",
           '            self.comm.all_reduce_sum_(flat, f"{what} ({dtype})")\n'
           "            if dtype.is_floating_point or dtype.is_complex:\n"
           "                flat.div_(self.comm.world_size)\n",
           "averaging hands every local replica the first replica's weights (mean over processes only)",
           ("tests/distributed/test_local_sgd.py::test_period_h_matches_a_hand_written_loop_and_logs_rounds",)),
    Mutant("localsgd-divisor", "src/hdopt/distributed/averaging.py",
           "count = len(per_replica) * self.comm.world_size",
           "count = len(per_replica)",
           "the sum over K replicas x N processes is divided by K only",
           ("tests/distributed/test_multiprocess.py::test_two_processes_equal_the_simulated_mode",)),
    Mutant("lab-average-one-worker", "src/hdopt/dynamics/experiments/localsgd.py",
           "ps[0].copy_(torch.stack(ps[1:]).mean(0))",
           "ps[0].copy_(ps[1])",
           "the Local SGD experiment measures the first worker instead of the workers' average",
           ("tests/dynamics/test_localsgd_experiment.py::test_the_measured_model_is_the_workers_average",)),
    # -- TinT ---------------------------------------------------------------------------------------------
    Mutant("tint-x4-bias", "src/hdopt/tint/backward.py",
           '        du2 = _lin_grad(grads, "fc", p, dh, c["u2"])\n',
           '        du2 = _lin_grad(grads, "fc", p, dh, c["u2"])\n'
           '        grads["proj.b"] = 4 * grads["proj.b"]\n',
           "the MLP output bias takes a 4x step (the reference code's defect)",
           ("tests/tint/test_structured.py::test_exact_mode_is_sgd[gpt2-sum-1]",
            "tests/tint/test_structured.py::test_reference_mode_matches_its_autograd_rule[gpt2]")),
    Mutant("tint-all-token-gradient", "src/hdopt/tint/backward.py",
           "    dlogits *= weight[..., None]\n",
           "",
           "with label targets the simulated gradient still sums over every context token",
           ("tests/tint/test_targets.py::test_label_only_update_is_sgd_on_the_label_loss[sum-1-gpt2]",)),
    # -- the verdicts ---------------------------------------------------------------------------------------
    Mutant("verdict-lab-forced", "src/hdopt/report/lab.py",
           "verdict=verdict_of_checks(checks),",
           'verdict="reproduced",',
           "every lab claim of the report says 'reproduced'",
           (VERDICTS + "test_lab_claims_follow_their_measurements[mirror]",)),
    Mutant("verdict-localsgd-trace-forced", "src/hdopt/dynamics/experiments/localsgd.py",
           '"> 0", smallest_drop, smallest_drop > 0,',
           '"> 0", smallest_drop, True,',
           "the Local SGD check 'the Hessian trace falls as H grows' always passes",
           (VERDICTS + "test_lab_claims_follow_their_measurements[localsgd]",)),
    Mutant("verdict-qsr-syncs", "src/hdopt/dynamics/experiments/localsgd.py",
           'qsr["syncs"] < const["syncs"] and vs_base >= -config.equal_accuracy,',
           "vs_base >= -config.equal_accuracy,",
           "the QSR check forgets 'with fewer synchronizations': equal accuracy with as many passes",
           (VERDICTS + "test_qsr_needs_fewer_synchronizations_and_more_accuracy",)),
    Mutant("verdict-equilibrium-self", "src/hdopt/dynamics/experiments/equilibrium.py",
           'within(m["angle"], predicted_angle, config.rel_tol)',
           'within(m["angle"], m["angle"], config.rel_tol)',
           "the equilibrium check compares the measured angular update with itself",
           (VERDICTS + "test_lab_claims_follow_their_measurements[equilibrium]",)),
    Mutant("verdict-equilibrium-ratio", "src/hdopt/dynamics/experiments/equilibrium.py",
           'tail_rms(runs["A"]["norm"]) / tail_rms(runs["B"]["norm"])',
           'tail_rms(runs["A"]["norm"]) / tail_rms(runs["A"]["norm"])',
           "the equilibrium norm ratio divides run A's norm by itself",
           ("tests/dynamics/test_verdict_logic.py::test_equilibrium_summary_compares_the_right_runs",)),
    Mutant("verdict-mezo-accuracy-forced", "src/hdopt/report/finetune.py",
           "verdict=verdict_from(above and close, above, acc.values()),",
           'verdict="reproduced",',
           "the MeZO accuracy claim says 'reproduced' whatever the accuracies",
           (VERDICTS + "test_mezo_accuracy_claim",)),
    Mutant("verdict-top-block-close-to-ft", "src/hdopt/report/finetune.py",
           "verdict=verdict_from(above_prompting and close_to_ft, above_prompting, acc.values()),",
           "verdict=verdict_from(above_prompting, above_prompting, acc.values()),",
           "the best forward-only claim forgets that it must come within a few points of FT",
           (VERDICTS + "test_best_forward_only_claim",)),
    Mutant("verdict-forward-goal-best-not-final", "src/hdopt/finetune/budget_goals.py",
           "target = mezo[-1][1]",
           "target = max(dev for _, dev in mezo)",
           "the successor goal races to MeZO's best dev accuracy instead of its final one",
           ("tests/finetune/test_budget_goals.py::test_curves_decide_the_forward_goal_against_mezos_last_evaluation",)),
    Mutant("verdict-forward-goal-budget-of-zero", "src/hdopt/finetune/budget_goals.py",
           'if mezo["forwards_to_mezo_final"] <= 0:',
           'if mezo["forwards_to_mezo_final"] < 0:',
           "a MeZO run that never rose above its start gives a budget of 0 that any successor meets",
           ("tests/finetune/test_budget_goals.py::test_the_forward_goal_refuses_a_mezo_run_that_never_rose_above_its_start",)),
    # -- top-block ZO ---------------------------------------------------------------------------------------
    Mutant("top-block-not-causal", "src/hdopt/lm/top_blocks.py",
           "allowed = (positions <= pos[:, None]) & attention_mask[seq].bool()",
           "allowed = (positions[None, :] >= 0) & attention_mask[seq].bool()",
           "the fast last block lets a position attend to the positions after it",
           ("tests/lm/test_top_blocks.py::test_the_last_block_at_the_asked_positions_equals_the_whole_top",)),
    Mutant("top-block-stale-cache", "src/hdopt/lm/top_blocks.py",
           "return [tuple(batch.input_ids[s, :n].tolist()) for s, n in enumerate(lengths)]",
           "return [tuple(batch.input_ids[s, :2].tolist()) for s, n in enumerate(lengths)]",
           "the activation cache keys a sequence by its first tokens, so different sequences share rows",
           ("tests/lm/test_top_blocks.py::test_the_cache_keeps_each_sequence_once_whatever_its_batch",
            "tests/lm/test_top_blocks.py::test_the_top_block_loss_and_predictions_are_the_whole_models")),
    # -- node perturbation of read-position adapters -------------------------------------------------------
    Mutant("read-np-slope-sign", "src/hdopt/finetune/read_node_perturbation.py",
           "slopes = (losses[1 : 1 + n] - losses[1 + n :]) / (2 * self.eps)",
           "slopes = (losses[1 + n :] - losses[1 : 1 + n]) / (2 * self.eps)",
           "the read adapters' central slopes take L(-) - L(+): the estimate points uphill",
           (READ + "test_the_estimate_is_node_perturbation_of_the_bottleneck_gradients",
            READ + "test_read_adapters_lower_the_training_loss")),
    Mutant("read-exact-late-copies-from-the-last", "src/hdopt/lm/read_path.py",
           "h = torch.cat([h, h[:1].expand(started - h.shape[0], -1, -1)])",
           "h = torch.cat([h, h[-1:].expand(started - h.shape[0], -1, -1)])",
           "a copy that starts at a later block starts from the last perturbed copy's state, not the "
           "unperturbed one's",
           (READ + "test_copies_that_start_at_a_later_block_equal_copies_run_through_every_block",
            READ + "test_the_coordinates_estimate_is_backprops_gradient_up_to_its_forward_difference")),
    Mutant("read-exact-coordinates-transposed", "src/hdopt/finetune/read_node_perturbation.py",
           "delta = slopes.to(offsets.dtype).T.reshape(rows, layers, rank)",
           "delta = slopes.to(offsets.dtype).T.reshape(rows, rank, layers).transpose(1, 2)",
           "the coordinates estimate files copy l r + k's slope under the wrong block and coordinate",
           (READ + "test_the_coordinates_estimate_is_backprops_gradient_up_to_its_forward_difference",)),
    Mutant("read-adapters-ignore-padding", "src/hdopt/lm/read_adapters.py",
           "if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[-1] != width:",
           "if True:",
           "the adapters act at the batch's last column: a padding token in rows shorter than the longest",
           (READ + "test_the_adapters_act_only_at_each_rows_last_token_and_the_read_path_reproduces_the"
            "_model",)),
    Mutant("verdict-memory", "src/hdopt/report/finetune.py",
           "verdict=verdict_from(zo_ratio <= 1.05 and ft_ratio > 1.5, zo_ratio <= 1.2, mib.values()),",
           "verdict=verdict_from(zo_ratio <= 1.05, zo_ratio <= 1.2, mib.values()),",
           "the memory claim forgets that backprop must need more than 1.5x MeZO's memory",
           (VERDICTS + "test_memory_claim",)),
    Mutant("verdict-step-cost-nan", "src/hdopt/report/finetune.py",
           "rad <= 2.5 or gauss <= 3.5, (rad, gauss)),",
           "rad <= 2.5 or gauss <= 3.5, (rad,)),",
           "the step-cost verdict's NaN guard reads the Rademacher figure only",
           (VERDICTS + "test_zo_step_cost_claim",)),
    # -- memory ---------------------------------------------------------------------------------------------
    Mutant("memory-clone-step", "src/hdopt/zo/base.py",
           "        pending = self._pending\n        grads = self.projected_gradients(pending)\n",
           "        pending = self._pending\n"
           '        backup = [p.detach().clone() for g in self.param_groups for p in g["params"]]  # noqa\n'
           "        grads = self.projected_gradients(pending)\n",
           "every ZO step backs up every parameter (a copy of the model)",
           ("tests/zo/test_memory.py::test_zo_step_peak_is_inference_plus_one_module_plus_noise[rademacher]",)),
    Mutant("memory-auto-inplace", "src/hdopt/zo/base.py",
           'if group["perturb"] == "inplace" or (group["perturb"] == "auto" and slots[id(p)].ident in '
           "wanted)",
           'if group["perturb"] != "forward"',
           "perturb='auto' perturbs every tensor in place (a backup copy of each, every evaluation)",
           ("tests/zo/test_memory.py::test_zo_step_peak_is_inference_plus_one_module_plus_noise[gaussian]",)),
)


class SnippetError(ValueError):
    """A mutant's original snippet does not occur exactly once, or its replacement does not compile."""


def mutated_text(mutant: Mutant, root: Path) -> str:
    """The text of ``mutant.path`` under ``root`` with the mutant applied (nothing is written)."""
    path = root / mutant.path
    if not path.is_file():
        raise SnippetError(f"{mutant.id}: {mutant.path} does not exist: the code moved, update the mutant")
    text = path.read_text(encoding="utf-8")
    count = text.count(mutant.original)
    if count != 1:
        raise SnippetError(f"{mutant.id}: its original snippet occurs {count} times in {mutant.path} (must "
                           f"be exactly once): the code moved, update the snippet in scripts/mutants.py")
    if mutant.replacement == mutant.original:
        raise SnippetError(f"{mutant.id}: the replacement equals the original")
    new = text.replace(mutant.original, mutant.replacement)
    try:
        compile(new, str(path), "exec")
    except SyntaxError as err:
        raise SnippetError(f"{mutant.id}: the mutated {mutant.path} does not compile ({err.msg}, line "
                           f"{err.lineno}): a mutant is a bug, not a syntax error") from None
    return new


def check_mutants(mutants: Sequence[Mutant], root: Path = ROOT) -> list[str]:
    """Problems with the mutant table against the tree at ``root`` (empty: every mutant applies)."""
    problems = []
    ids = [m.id for m in mutants]
    problems += [f"{i}: the id is used twice" for i in sorted({i for i in ids if ids.count(i) > 1})]
    for m in mutants:
        if not m.tests:
            problems.append(f"{m.id}: no tests named")
        try:
            mutated_text(m, root)
        except SnippetError as err:
            problems.append(str(err))
    return problems


def copy_tree(root: Path, dest: Path) -> Path:
    """``root/src`` copied to ``dest/src`` (no bytecode caches); returns the copy's ``src``."""
    return Path(shutil.copytree(root / "src", dest / "src",
                                ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")))  # fmt: skip


@dataclass
class Outcome:
    """A pytest run: counts from its JUnit report, the failing node ids, and its exit status."""

    returncode: int
    tests: int
    failed: list[str]
    skipped: int
    seconds: float
    timed_out: bool = False

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and self.tests > 0 and not self.failed and not self.skipped


def _junit(path: Path) -> tuple[int, list[str], int]:
    """(tests, failed node names, skipped) from a JUnit XML report (absent: a run that never started)."""
    if not path.is_file():
        return 0, [], 0
    tests, failed, skipped = 0, [], 0
    for case in ET.parse(path).getroot().iter("testcase"):
        tests += 1
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
        elif case.find("skipped") is not None:
            skipped += 1
    return tests, failed, skipped


def run_tests(tests: Sequence[str], src: Path, cwd: Path, timeout: float,
              stop_at_first: bool = True) -> Outcome:  # fmt: skip
    """Run ``tests`` with pytest in ``cwd``, importing the package from ``src`` (by default up to the first
    failure).

    The child runs in its own process group, which is killed on a timeout or an interrupt (Ctrl-C), so no
    test process outlives the script.
    """
    with tempfile.TemporaryDirectory(prefix="hdopt-mutants-junit-") as tmp:
        report = Path(tmp) / "junit.xml"
        env = {**os.environ, "PYTHONPATH": str(src), "PYTHONDONTWRITEBYTECODE": "1"}
        cmd = [sys.executable, "-m", "pytest", "-q", *(["-x"] if stop_at_first else []), "-p",
               "no:cacheprovider", f"--junitxml={report}", *tests]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # also on KeyboardInterrupt: the tests' process group goes with us
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        count, failed, skipped = _junit(report)
        return Outcome(proc.returncode, count, failed, skipped, time.perf_counter() - start, timed_out)


def outcome_status(outcome: Outcome) -> str:
    """``caught`` (a test failed, or the run hung past its timeout), ``escaped`` (every test passed) or
    ``error`` (pytest could not run the selection: usage error, nothing collected)."""
    if outcome.timed_out or (outcome.returncode == 1 and outcome.failed):
        return "caught"
    if outcome.returncode == 0 and outcome.tests and not outcome.failed:
        return "escaped"
    return "error"


def run_mutant(mutant: Mutant, root: Path, timeout: float) -> tuple[str, Outcome]:
    """Apply ``mutant`` to a temporary copy of ``root/src`` and run its tests there; the copy is removed
    afterwards whatever happens (``root`` is only read)."""
    text = mutated_text(mutant, root)
    with tempfile.TemporaryDirectory(prefix=f"hdopt-mutant-{mutant.id}-") as tmp:
        src = copy_tree(root, Path(tmp))
        (Path(tmp) / mutant.path).write_text(text, encoding="utf-8")
        outcome = run_tests(mutant.tests, src, root, timeout)
    return outcome_status(outcome), outcome


def run_baseline(mutants: Sequence[Mutant], root: Path, timeout: float,
                 package: str = "hdopt") -> tuple[list[str], Outcome | None]:  # fmt: skip
    """Run every test the mutants name, once, on an unmutated copy of ``root/src`` (one pytest run); returns
    (problems, outcome): each must pass, none may be skipped, and ``package`` must come from the copy."""
    tests = list(dict.fromkeys(t for m in mutants for t in m.tests))
    with tempfile.TemporaryDirectory(prefix="hdopt-mutants-baseline-") as tmp:
        src = copy_tree(root, Path(tmp))
        check = subprocess.run([sys.executable, "-c", f"import {package}; print({package}.__file__)"],
                               cwd=root, env={**os.environ, "PYTHONPATH": str(src)}, capture_output=True,
                               text=True)  # fmt: skip
        if not check.stdout.strip().startswith(str(src)):
            found = check.stdout.strip() or check.stderr[-300:]
            return [f"{package} is imported from {found!r}, not from the copy {src}: something on sys.path "
                    "shadows PYTHONPATH"], None
        outcome = run_tests(tests, src, root, timeout, stop_at_first=False)
    problems = [f"baseline: {name} failed" for name in outcome.failed]
    if outcome.skipped:
        problems.append(f"baseline: {outcome.skipped} test(s) skipped (is ../shared/data missing?)")
    if outcome.timed_out:
        problems.append(f"baseline: timed out after {timeout:g} s")
    elif not outcome.passed and not problems:
        problems.append(f"baseline: pytest exited with {outcome.returncode} after {outcome.tests} tests "
                        "(a node id that does not exist?)")
    return problems, outcome


def table(rows: list[dict]) -> str:
    """The results as a Markdown table."""
    lines = ["| id | file | bug | result | seconds |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['id']} | {r['path'].removeprefix('src/hdopt/')} | {r['description']} | "
                     f"{r['status']} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--only", default="", help="comma-separated mutant ids (writes no results file)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per test run (a hang = caught)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results file (default for a full run: {RESULTS.relative_to(ROOT)})")
    return parser.parse_args(argv)


def select(only: str) -> list[Mutant]:
    if not only:
        return list(MUTANTS)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    known = {m.id: m for m in MUTANTS}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SystemExit(f"unknown mutant id(s) {unknown}; `--list` shows them")
    return [known[w] for w in wanted]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # clean up as on Ctrl-C
    mutants = select(args.only)
    if args.list:
        for m in mutants:
            print(f"{m.id}  ({m.path}): {m.description}")
            print("".join(f"    {t}\n" for t in m.tests), end="")
        return 0
    problems = check_mutants(mutants)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    started = time.perf_counter()
    print("baseline: every named test on an unmutated copy of src ...", flush=True)
    problems, baseline = run_baseline(mutants, ROOT, 3 * args.timeout)
    if problems:
        print("\n".join(problems) + "\nrefusing to report: a mutant caught by an already failing test proves "
              "nothing; fix the baseline first", file=sys.stderr)
        return 2
    rows = []
    for i, m in enumerate(mutants, 1):
        status, outcome = run_mutant(m, ROOT, args.timeout)
        rows.append({"id": m.id, "path": m.path, "description": m.description, "tests": list(m.tests),
                     "status": status, "seconds": round(outcome.seconds, 1), "failed": outcome.failed,
                     "timed_out": outcome.timed_out})  # fmt: skip
        print(f"[{i}/{len(mutants)}] {m.id}: {status} ({outcome.seconds:.1f} s)", flush=True)
    caught = sum(r["status"] == "caught" for r in rows)
    print("\n" + table(rows) + f"\n\n{caught} of {len(rows)} caught")
    errors = [r["id"] for r in rows if r["status"] == "error"]
    if errors:
        print(f"could not run the tests of {errors}", file=sys.stderr)
    out = args.out or (None if args.only else RESULTS)
    if out is not None:
        save(out, rows, caught, baseline, time.perf_counter() - started)
        print(f"saved {out}")
    return 2 if errors else 0 if caught == len(rows) else 1


def save(out: Path, rows: list[dict], caught: int, baseline: Outcome, total_s: float) -> None:
    """Write the results file (atomically, with hdopt.io)."""
    sys.path.insert(0, str(ROOT / "src"))
    from hdopt.io import atomic_write_json

    atomic_write_json(out, {
        "command": "PYTHONPATH=src python scripts/mutants.py",
        "hardware": f"{os.cpu_count()}-core CPU ({platform.machine()})",
        "versions": {"python": platform.python_version(), "torch": metadata.version("torch"),
                     "pytest": metadata.version("pytest")},
        "date": time.strftime("%Y-%m-%d"),
        "caught": caught, "total": len(rows), "escaped": [r["id"] for r in rows if r["status"] == "escaped"],
        "baseline": {"tests": baseline.tests, "passed": baseline.passed,
                     "seconds": round(baseline.seconds, 1)},
        "seconds": round(total_s, 1),
        "mutants": rows,
    })  # fmt: skip


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the temporary copies and the tests' processes are gone already
        print("\ninterrupted: no results written; the working tree was never modified", file=sys.stderr)
        sys.exit(130)
