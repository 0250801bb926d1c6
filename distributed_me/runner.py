"""`dme attack` in process: resolve victim and pool, put the victim behind a :class:`LocalOracle`, run, log to
MLflow."""

from __future__ import annotations

import logging

from .data import load_pool
from .data.base import Pool
from .errors import DmeError
from .extraction import AttackSpec, Evaluator, ExtractionResult, run_extraction
from .http_oracle import HttpOracle
from .oracle import LocalOracle
from .victims import Victim, load_victim, victim_test_split

log = logging.getLogger(__name__)

DEFAULT_POOL = "photos"


def remote_oracle(url: str, api_key: str | None, judge: Victim):
    """An HTTP oracle, checked against the judging victim: both must be the same task (classes, input shape)."""
    if not api_key:
        raise DmeError("--victim-url needs --api-key (the key the server's spec gives you)")
    oracle = HttpOracle(url, api_key)
    if oracle.info.class_names != list(judge.class_names) or tuple(oracle.info.input_shape) != judge.input_shape:
        raise DmeError(f"the victim at {url} ({oracle.info.num_classes} classes, input {oracle.info.input_shape}) is "
                       f"not the judging victim {judge.meta.name!r} ({len(judge.class_names)} classes, input "
                       f"{judge.input_shape}): pass the same victim with --victim")
    return oracle


def evaluator_for(victim: Victim, data_root: str | None = None, download: bool = False) -> Evaluator:
    x, y = victim_test_split(victim, root=data_root, download=download)
    return Evaluator(victim.predict_labels, x, y, victim_probs=victim.predict_probs)


def log_extraction_run(result: ExtractionResult, params: dict, experiment: str, run_name: str,
                       tags: dict | None = None) -> str:
    """One MLflow run per extraction: every choice as a param, per-epoch and final metrics, the time split."""
    import mlflow

    from .tracking import mlflow_run

    with mlflow_run(experiment, run_name, tags={"dme.kind": "attack", **(tags or {})}) as run:
        mlflow.log_params({k: str(v) for k, v in params.items()})
        for row in result.history:
            mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
        mlflow.log_metrics(result.metrics())
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
    victim_url: str | None = None,
    api_key: str | None = None,
) -> ExtractionResult:
    """One extraction. Queries go to ``victim_url`` over HTTP when given (the victim's output policy is then the
    server's), else to an in-process oracle over ``victim``. ``victim`` is always the judge: the evaluator reads its
    test split and unmetered top-1 for fidelity, as the benchmark (not the attacker) may."""
    v = victim if isinstance(victim, Victim) else load_victim(victim, progress)
    p = pool if isinstance(pool, Pool) else load_pool(pool or DEFAULT_POOL, root=data_root, download=download,
                                                    seed=spec.seed)
    if victim_url:
        oracle = remote_oracle(victim_url, api_key, v)
    else:
        oracle = LocalOracle(v, output_policy, budget=spec.budget, name=v.meta.name, seed=spec.seed)
    spec.build_strategy().check(oracle, p, spec.budget)  # fail before the (slower) evaluator setup
    evaluator = evaluator_for(v, data_root, download)
    # the policy is known only in process; a remote API's policy is the server's, and its utility the server's to judge
    result = run_extraction(oracle, p, spec, evaluator, progress=progress,
                            policy=None if victim_url else output_policy)
    if log_mlflow:
        params = {**spec.model_dump(), "victim": v.meta.name, "pool": p.name, "output_policy": oracle.info.returns,
                  "oracle": "http" if victim_url else "in-process",
                  # a remote API does not disclose its defense (its metadata shows the output kind only)
                  "output_policy_chain": ",".join(d["name"] for d in oracle.info.policy) or "undisclosed"}
        tags = {"dme.victim": v.meta.name, "dme.attack": spec.strategy, "dme.budget": str(spec.budget),
                "dme.defense": params["output_policy_chain"]}
        log_extraction_run(result, params, experiment, f"{spec.strategy}-{v.meta.name}-b{spec.budget}", tags)
    return result
