"""One sweep trial, as a Ray Tune function trainable: an attacker with its own API key against a served victim.

The trial gets its factor combination and the sweep context in ``config``, registers a fresh API key with the sweep's
accounting replica (budget = the trial's budget, only for its victim × policy deployment), then runs the very
:func:`~distributed_me.extraction.run_extraction` that ``dme attack`` runs — through a
:class:`~distributed_me.serving.clients.HandleOracle`, never the victim's weights. The victim bundle is loaded here
only as the benchmark's judge (test split and unmetered top-1 for fidelity), as in ``dme attack``.

Every epoch is reported to Tune (ASHA stops on it) and to the trial's MLflow child run; the final report carries
accuracy, fidelity, adversarial fidelity, queries and the time split, and the piracy model is logged as an artifact.
A retried trial is a new attempt with a new key and a new child run; the failed attempt's run stays FAILED.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from ..extraction import AttackSpec, ExtractionResult, run_extraction
from .spec import FACTORS, SweepSpec
from .tracking import TrialRun, finished_trial, trial_key

log = logging.getLogger(__name__)


@lru_cache(maxsize=4)
def _judge(bundle: str):
    """Victim and evaluator, cached per worker process: consecutive trials on one worker share them."""
    from ..runner import evaluator_for
    from ..victims import load_bundle

    victim = load_bundle(bundle)
    return victim, evaluator_for(victim)


@lru_cache(maxsize=16)
def _utility(bundle: str, policy: str) -> float:
    """The defender's side: accuracy of the labels the API returns under ``policy`` on the victim's test split."""
    from ..defenses import parse_policy
    from ..metrics import accuracy

    victim, evaluator = _judge(bundle)
    answer = parse_policy(policy)(victim.predict_probs(evaluator.images).numpy())
    return accuracy(answer.labels, evaluator.labels.numpy())


@lru_cache(maxsize=2)
def _pool(name: str, options: tuple):
    from ..data import load_pool

    return load_pool(name, **dict(options))


def attack_spec(spec: SweepSpec, f: dict[str, Any]) -> AttackSpec:
    return AttackSpec(strategy=f["strategy"], strategy_options=spec.attack.strategy_options.get(f["strategy"], {}),
                      budget=int(f["budget"]), arch=f["arch"], pretrained=f["pretrained"], optimizer=f["optimizer"],
                      lr=f["lr"], epochs=int(f["epochs"]), batch_size=spec.attack.batch_size,
                      augment=bool(f["augment"]), seed=int(f["seed"]), adv_eval_samples=spec.adv_eval_samples)


def final_metrics(r: ExtractionResult) -> dict[str, float]:
    return {"victim_accuracy": r.victim_accuracy, "accuracy": r.accuracy, "fidelity": r.fidelity,
            "adversarial_fidelity": r.adversarial_fidelity, "queries_used": float(r.queries_used),
            **{f"seconds_{k}": v for k, v in r.seconds.items()}}


def run_trial(config: dict[str, Any]) -> None:
    """The Tune trainable. ``config = {"factors": {...}, "ctx": {...}}`` (see :mod:`distributed_me.sweep.runner`)."""
    from ray import serve, tune

    from ..serving.clients import HandleOracle

    ctx = config["ctx"]
    spec = SweepSpec.model_validate(ctx["spec"])
    f = {k: config["factors"][k] for k in FACTORS}
    torch.set_num_threads(max(1, int(round(ctx["cpus_per_trial"]))))
    os.environ["MLFLOW_TRACKING_URI"] = ctx["tracking_uri"]
    trial_id = tune.get_context().get_trial_id() or uuid.uuid4().hex[:8]
    done = finished_trial(ctx["experiment_id"], ctx["parent_run_id"], trial_key(f))
    if done is not None:
        log.info("trial %s already finished as MLflow run %s: not run again", trial_id, done.info.run_id)
        tune.report({**done.data.metrics, "epoch": int(f["epochs"]), "completed": True,
                     "mlflow_run_id": done.info.run_id, "reused": True})
        return
    deployment = spec.deployment_name(f["victim"], f["policy"])

    # a fresh key per attempt: a retried trial starts with its full budget, and budgets never mix between trials
    key = f"trial-{trial_id}-{uuid.uuid4().hex}"
    accountant = serve.get_deployment_handle("Accountant", ctx["app_name"])
    accountant.add_client.remote({"key": key, "budget": int(f["budget"]), "victims": [deployment]}).result()

    name = (f"{f['strategy']}-{f['victim']}-{f['policy']}-b{f['budget']}-{f['arch']}-{f['optimizer']}"
            f"-lr{f['lr']}-s{f['seed']}")
    with TrialRun(ctx["experiment_id"], ctx["parent_run_id"], spec.name, name, f,
                  {"dme.trial_id": trial_id, "dme.deployment": deployment}) as run:
        victim, evaluator = _judge(ctx["bundles"][f["victim"]])
        pool = _pool(spec.pool, tuple(sorted(spec.pool_options.items())))
        oracle = HandleOracle(deployment, key, ctx["app_name"])

        def on_epoch(epoch: int, row: dict) -> None:
            metrics = {k: float(v) for k, v in row.items() if k != "epoch"}
            run.metrics(metrics, step=epoch)
            tune.report({**metrics, "epoch": epoch, "completed": False})

        result = run_extraction(oracle, pool, attack_spec(spec, f), evaluator, on_epoch=on_epoch,
                                eval_every_epoch=spec.eval_every_epoch)
        final = {**final_metrics(result), "victim_utility": _utility(ctx["bundles"][f["victim"]], f["policy"])}
        run.metrics(final, step=int(f["epochs"]))
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "piracy_model.pt"
            torch.save({"state_dict": result.model.state_dict(), "arch": f["arch"],  # type: ignore[union-attr]
                        "num_classes": len(victim.class_names), "input_shape": list(victim.input_shape)}, path)
            run.artifact(path)
    # after the run is closed: Tune may end the trial inside this call (`done` would too, hence `completed`)
    tune.report({**final, "epoch": int(f["epochs"]), "completed": True, "mlflow_run_id": run.run_id})
