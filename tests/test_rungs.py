"""Multi-fidelity trials (`search.rungs`): who a candidate competes with at a rung, when it stops, how the study
records it, and a tiny study whose candidates are scored at a rung and stopped there."""
from __future__ import annotations

import os

import optuna
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.trial import TrialState

from conftest import STUDY, TEST_CPU_LOCK, TINY_SEARCH, run_cli
from search.attributes import TRIAL_BASELINE, TRIAL_STOPPED_AT, TRIAL_TARGET
from search.config import check_rungs
from search.rungs import RungJudge, RungReport, RungRule, behind, leader, rung_key, rung_reports
from train.errors import ConfigError
from train.locks import cpu_work


def test_a_candidate_competes_with_its_own_target_or_with_trials_that_cost_no_more():
    seed_rule = RungReport(trial=1, hmean=0.80, cost=0.50, target=0.5)
    other_target = RungReport(trial=2, hmean=0.95, cost=0.70, target=0.3)
    candidate = RungReport(trial=5, hmean=0.69, cost=0.495, target=0.5)
    assert leader(candidate, [seed_rule, other_target, candidate]) == seed_rule
    assert behind(candidate, [seed_rule, other_target], margin=0.1) == seed_rule  # 0.80 >= 0.69 + 0.1
    assert behind(candidate, [seed_rule, other_target], margin=0.12) is None
    assert behind(RungReport(6, 0.75, 0.5, 0.5), [seed_rule], margin=0.1) is None
    assert behind(seed_rule, [candidate], margin=0.0) is None  # the leader itself goes on
    assert leader(candidate, [other_target]) is None  # alone at its target: nothing to compare with

    # A free space (no targets): rivals are the trials that cost no more.
    cheap = RungReport(trial=1, hmean=0.9, cost=0.4, target=None)
    dear = RungReport(trial=2, hmean=0.99, cost=0.8, target=None)
    assert behind(RungReport(3, 0.5, 0.6, None), [cheap, dear], margin=0.1) == cheap
    assert behind(RungReport(4, 0.5, 0.3, None), [cheap, dear], margin=0.1) is None


def test_the_judge_records_every_score_and_stops_only_candidates():
    study = optuna.create_study(directions=["maximize", "minimize"])
    rule = RungRule(steps=(20,), margin=0.1)
    baseline = study.ask()
    baseline.set_user_attr(TRIAL_TARGET, 0.5)
    assert RungJudge(study, baseline.number, rule, 0.5, stoppable=False)(20, 0.30, 0.5) is None
    study.tell(baseline, [0.9, 0.5])
    failed = study.ask()
    failed.set_user_attr(rung_key(20), {"hmean": 0.99, "cost": 0.5})
    failed.set_user_attr(TRIAL_TARGET, 0.5)
    study.tell(failed, state=TrialState.FAIL)  # a failed trial's score does not count
    running = study.ask()
    running.set_user_attr(TRIAL_TARGET, 0.5)
    assert RungJudge(study, running.number, rule, 0.5, stoppable=True)(20, 0.45, 0.49) is None
    late = study.ask()  # asynchronous: the running trial's report counts for the next one
    rival = RungJudge(study, late.number, rule, 0.5, stoppable=True)(20, 0.34, 0.50)
    assert rival is not None and rival.trial == running.number and rival.hmean == pytest.approx(0.45)
    # A baseline (or a re-evaluation) never stops, however far behind.
    second = study.ask()
    assert RungJudge(study, second.number, rule, 0.5, stoppable=False)(20, 0.0, 0.5) is None
    assert [(r.trial, r.hmean) for r in rung_reports(study, 20)] == [(0, 0.30), (2, 0.45), (3, 0.34), (4, 0.0)]
    assert rung_reports(study, 60) == []


def test_rung_settings_are_checked():
    def cfg(steps, margin=0.1):
        return OmegaConf.create({"search": {"rungs": {"steps": steps, "margin": margin}}, "finetune": {"steps": 60}})

    check_rungs(cfg([20, 40]))
    check_rungs(cfg([]))
    check_rungs(cfg([20, 80]))  # past the recovery: no rung there (tiny recoveries simply have none)
    assert RungRule.from_config(cfg([20, 80])).active_steps(60) == (20,)
    for bad in ([0], [40, 20], [20, 20]):
        with pytest.raises(ConfigError, match="search.rungs.steps"):
            check_rungs(cfg(bad))
    with pytest.raises(ConfigError, match="search.rungs.margin"):
        check_rungs(cfg([20], margin=-0.1))


def test_a_study_scores_candidates_at_a_rung_and_stops_the_losers(tmp_path):
    """Tiny study, one rung after the first of 3 recovery steps and margin 0: every recovered trial reports its
    rung; a candidate that a rival at its target matched or beat there is stopped, told PRUNED with `stopped_at`,
    counted in n_trials, its MLflow run named `stopped@1`; the others finish with a final score. (After one step
    the tiny model detects nothing, so the candidate ties with the seed rule's plan at its target, and stops.)"""
    out = tmp_path / "study"
    env = dict(os.environ, OCRDET_CACHE_DIR=str(tmp_path / "cache"))
    env.setdefault("OMP_NUM_THREADS", "2")
    args = ["multirun", *TINY_SEARCH, "finetune.steps=3", "search.rungs.steps=[1]", "search.rungs.margin=0",
            "search.screening.enabled=false", "search.n_trials=4", "search.select.min_agreement=null",
            "search.select.max_flops_ratio=null", f"out_dir={out}"]
    with cpu_work(TEST_CPU_LOCK):
        proc = run_cli("search", args, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out}/optuna.db").trials
    assert len(trials) == 4 and all(t.state.is_finished() for t in trials)
    assert rung_key(1) not in trials[0].user_attrs  # the unpruned model is not recovered: no rung
    reports = {t.number: RungReport(t.number, t.user_attrs[rung_key(1)]["hmean"], t.user_attrs[rung_key(1)]["cost"],
                                    t.user_attrs.get(TRIAL_TARGET)) for t in trials[1:]}
    stopped = [t for t in trials if t.state == TrialState.PRUNED]
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    for t in trials[1:]:
        earlier = [reports[n] for n in reports if n < t.number]  # one worker: the trials before it had reported
        rival = behind(reports[t.number], earlier, margin=0.0)
        if t.user_attrs.get(TRIAL_BASELINE) or rival is None:
            assert t.state == TrialState.COMPLETE and TRIAL_STOPPED_AT not in t.user_attrs
            continue
        assert t.state == TrialState.PRUNED and t.user_attrs[TRIAL_STOPPED_AT] == 1
        assert "hmean" not in t.user_attrs and t.user_attrs["rung_hmean"] == pytest.approx(reports[t.number].hmean)
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.tags["mlflow.runName"].startswith(f"trial-{t.number} stopped@1 h=")
        assert run.data.tags[TRIAL_STOPPED_AT] == "1" and run.info.status == "FINISHED"
        assert not (out / "trials" / str(t.number) / "finetuned.pdparams").exists()
    assert stopped, "no candidate stopped: the test's premise (tied or lower rung scores) did not hold"
    assert "stopped at rung 1" in proc.stdout + proc.stderr
