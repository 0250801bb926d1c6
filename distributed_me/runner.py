"""`dme attack` in process: resolve victim and pool, put the victim behind a :class:`LocalOracle`, run, log to
MLflow."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from .answer import Answer
from .cost.guard import ANNOUNCE_S, check_limit, limit_seconds
from .cost.history import DEVICE_TAG, learned_factors
from .cost.plan import cost_job, describe, extraction_work, project, projection_metrics, smaller_attack
from .cost.rates import SERVE_REQUEST_S, Device, Rates
from .cost.work import Net, Projection, human
from .data import load_dataset, load_pool
from .data.base import Pool
from .errors import DmeError
from .extraction import KL_TRAIN_IMAGES, AttackSpec, Evaluator, ExtractionResult, PolicyAnswers, run_extraction
from .http_oracle import HttpOracle
from .oracle import LocalOracle, query_in_batches
from .victims import Victim, load_victim, victim_test_split
from .victims.train import dataset_tensors

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


def policy_answers(victim: Victim) -> PolicyAnswers:
    """How the API answers ``images`` under an output policy, in process (:class:`LocalOracle`: seed 0, the empty
    client stream, the victim's defense kits), with the victim's own probabilities beside the answer."""

    def answer(policy: str, images: torch.Tensor) -> tuple[np.ndarray, Answer]:
        oracle = LocalOracle(victim, policy, watermarks=False)  # pricing a policy is not a client: no evidence
        return victim.predict_probs(images).numpy(), query_in_batches(oracle, images)

    return answer


def evaluator_for(victim: Victim, data_root: str | None = None, download: bool = False) -> Evaluator:
    """The judge of a victim: its test split, and its training split for the defender's KL_train."""
    ds = load_dataset(victim.meta.dataset, root=data_root, download=download, seed=victim.meta.split_seed)
    x, y = victim_test_split(victim, dataset=ds)
    c, s, _ = victim.input_shape
    x_train, _ = dataset_tensors(ds, "train", s, c)
    return Evaluator(victim.predict_labels, x, y, policy_answers=policy_answers(victim),
                     train_images=x_train[:KL_TRAIN_IMAGES])


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


def project_attack(spec: AttackSpec, input_shape: tuple[int, int, int], num_classes: int, pool: Pool,
                   victim: Victim, test_size: int, policy: str | None, *, remote: bool = False,
                   threads: int | None = None) -> tuple[Projection, Projection, Rates]:
    """One extraction priced on this process's device: (the cost model's projection, the same corrected by recorded
    runs, the rates it was priced with). ``remote``: queries go over HTTP (their overhead priced as a Serve
    request's)."""
    device = Device.here(threads)
    rates = Rates(device, request_s=SERVE_REQUEST_S if remote else 0.0)
    victim_net = Net(victim.meta.arch, victim.meta.img_size, victim.meta.in_chans, victim.meta.num_classes)
    job = cost_job(spec, input_shape, num_classes, pool, victim_net)
    raw = project(extraction_work(spec, job, test_size, policy=policy), rates)
    corrections = learned_factors(rates.key).factors(spec.strategy, victim.meta.name, spec.arch)
    return raw, raw.scaled(corrections), rates


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
    max_hours: float | None = None,
    cost_limit: bool = True,
    announce: Callable[[str], None] | None = None,
) -> ExtractionResult:
    """One extraction. Queries go to ``victim_url`` over HTTP when given (the victim's output policy is then the
    server's), else to an in-process oracle over ``victim``. ``victim`` is always the judge: the evaluator reads its
    test split and unmetered top-1 for fidelity, as the benchmark (not the attacker) may.

    Before any step the run is priced (:mod:`distributed_me.cost`): ``announce`` receives the projection when it is
    over a minute, and a projection over the limit (``max_hours``, see :mod:`distributed_me.cost.guard`) raises
    :class:`~distributed_me.cost.guard.CostLimitError` unless ``cost_limit`` is off."""
    v = victim if isinstance(victim, Victim) else load_victim(victim, progress)
    p = pool if isinstance(pool, Pool) else load_pool(pool or DEFAULT_POOL, root=data_root, download=download,
                                                    seed=spec.seed)
    if victim_url:
        oracle = remote_oracle(victim_url, api_key, v)
    else:
        oracle = LocalOracle(v, output_policy, budget=spec.budget, name=v.meta.name, seed=spec.seed)
    spec.build_strategy().check(oracle, p, spec.budget)  # fail before the (slower) evaluator setup
    evaluator = evaluator_for(v, data_root, download)
    raw, corrected, rates = project_attack(spec, oracle.info.input_shape, oracle.info.num_classes, p, v,
                                            len(evaluator.images), None if victim_url else output_policy,
                                            remote=bool(victim_url))
    device = rates.device
    if announce is not None and corrected.total > ANNOUNCE_S:
        announce(describe(corrected, f"{spec.strategy} attack, budget {spec.budget}, on {device.label}"))
    if cost_limit:
        def alternative() -> str | None:
            small, flags = smaller_attack(spec)
            small_s = project_attack(small, oracle.info.input_shape, oracle.info.num_classes, p, v,
                                     len(evaluator.images), output_policy, remote=bool(victim_url))[1].total
            return f"{flags} (projected {human(small_s)})" if flags and small_s < corrected.total else None

        check_limit(f"this {spec.strategy} attack", corrected.total, device.label, limit_seconds(max_hours),
                    alternative)
    # the policy is known only in process; a remote API's policy is the server's, and its utility the server's to judge
    result = run_extraction(oracle, p, spec, evaluator, progress=progress,
                            policy=None if victim_url else output_policy,
                            projected=projection_metrics(raw, corrected))
    if log_mlflow:
        params = {**spec.model_dump(), "victim": v.meta.name, "pool": p.name, "output_policy": oracle.info.returns,
                  "oracle": "http" if victim_url else "in-process",
                  # a remote API does not disclose its defense (its metadata shows the output kind only)
                  "output_policy_chain": ",".join(d["name"] for d in oracle.info.policy) or "undisclosed"}
        tags = {"dme.victim": v.meta.name, "dme.attack": spec.strategy, "dme.budget": str(spec.budget),
                "dme.defense": params["output_policy_chain"], DEVICE_TAG: rates.key}
        log_extraction_run(result, params, experiment, f"{spec.strategy}-{v.meta.name}-b{spec.budget}", tags)
    return result
