"""`dme attack` in process: resolve victim and pool, put the victim behind a :class:`LocalOracle`, run, log to MLflow."""

from __future__ import annotations

import logging

from .data import load_pool
from .data.base import Pool
from .extraction import AttackSpec, Evaluator, ExtractionResult, run_extraction
from .oracle import LocalOracle
from .victims import Victim, embedded_victim, resolve_victim, victim_test_split
from .victims.embedded import EMBEDDED_VICTIM

log = logging.getLogger(__name__)

DEFAULT_POOL = "photos"


def load_victim(spec: str | None, progress: bool = False) -> Victim:
    if spec in (None, "", EMBEDDED_VICTIM):
        return embedded_victim(progress=progress)[0]
    return resolve_victim(spec)


def evaluator_for(victim: Victim, data_root: str | None = None, download: bool = False) -> Evaluator:
    x, y = victim_test_split(victim, root=data_root, download=download)
    return Evaluator(victim.predict_labels, x, y)


def log_extraction_run(result: ExtractionResult, params: dict, experiment: str, run_name: str,
                       tags: dict | None = None) -> str:
    """One MLflow run per extraction: every choice as a param, per-epoch and final metrics, the time split."""
    import mlflow

    from .tracking import mlflow_run

    with mlflow_run(experiment, run_name, tags={"dme.kind": "attack", **(tags or {})}) as run:
        mlflow.log_params({k: str(v) for k, v in params.items()})
        for row in result.history:
            mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
        mlflow.log_metrics({
            "victim_accuracy": result.victim_accuracy, "accuracy": result.accuracy, "fidelity": result.fidelity,
            "adversarial_fidelity": result.adversarial_fidelity, "queries_used": result.queries_used,
            **{f"seconds_{k}": v for k, v in result.seconds.items()},
        })
        return run.info.run_id


def attack_in_process(
    spec: AttackSpec,
    victim: str | Victim | None = None,
    pool: str | Pool | None = None,
    output_policy: str = "probabilities",
    data_root: str | None = None,
    download: bool = False,
    progress: bool = False,
    log_mlflow: bool = True,
    experiment: str = "dme-attacks",
) -> ExtractionResult:
    v = victim if isinstance(victim, Victim) else load_victim(victim, progress)
    p = pool if isinstance(pool, Pool) else load_pool(pool or DEFAULT_POOL, root=data_root, download=download,
                                                    seed=spec.seed)
    oracle = LocalOracle(v, output_policy, budget=spec.budget, name=v.meta.name, seed=spec.seed)
    spec.build_strategy().check(oracle, p, spec.budget)  # fail before the (slower) evaluator setup
    evaluator = evaluator_for(v, data_root, download)
    result = run_extraction(oracle, p, spec, evaluator, progress=progress)
    if log_mlflow:
        params = {**spec.model_dump(), "victim": v.meta.name, "pool": p.name, "output_policy": oracle.info.returns,
                  "output_policy_chain": ",".join(d["name"] for d in oracle.info.policy)}
        tags = {"dme.victim": v.meta.name, "dme.attack": spec.strategy, "dme.budget": str(spec.budget),
                "dme.defense": params["output_policy_chain"]}
        log_extraction_run(result, params, experiment, f"{spec.strategy}-{v.meta.name}-b{spec.budget}", tags)
    return result
