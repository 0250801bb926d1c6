"""The sweep spec: a YAML file in ``sweeps/`` validated into a typed model before anything starts. No Ray here.

A sweep is a grid over victims × output policies (defenses) × attacker choices (unlabeled pool, strategy, budget,
piracy architecture, optimizer and LR, pre-training, augmentation, epochs, seeds), or an Optuna search over attacker
hyper-parameters with a trial budget. Every list-valued factor is a grid axis; a scalar is fixed. A *preset*
(``--preset cpu-small``) is a set of overrides deep-merged into the spec, so one file carries a paper-scale and a
laptop-scale version.

Validation covers names (strategy, architecture, optimizer, policy, pool), values (budgets > 0, …) and capabilities:
a strategy that needs confidence scores crossed with a label-only policy is an error here, naming both.

An attacker factor left out of the file takes :class:`~distributed_me.extraction.AttackSpec`'s default, the one place
attacker defaults live. ``plugins`` (``.py`` files or modules) are imported before validation, so a sweep can name an
attack that lives outside the package (see :mod:`distributed_me.plugins`).
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ..attacks import ATTACKS
from ..defenses import parse_policy
from ..errors import DmeError, explain_validation_error
from ..extraction import FACTORS, AttackSpec, refuse_label_targets
from ..models import MODELS
from ..parity import PaperTable, matches
from ..plugins import load_plugins
from ..spec_types import DetectorSpec, PolicySpec, SafeName, read_yaml_mapping
from ..train import OPTIMIZERS


def _listify(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def options_for_pool(pool_options: dict[str, Any], pools: list[str], pool: str) -> dict[str, Any]:
    """The loader options of ``pool``: its own mapping when ``pool_options`` is keyed by pools of the grid (and there
    are several), else ``pool_options`` as it is, shared by every pool."""
    o = pool_options
    if len(pools) > 1 and o and set(o) <= set(pools) and all(isinstance(v, dict) for v in o.values()):
        return dict(o.get(pool, {}))
    return dict(o)


class VictimRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: SafeName
    source: str = "embedded"


def _attack_default(name: str) -> Any:
    """A factor left out of the sweep: AttackSpec's default (as a one-point axis, or as is for scalars)."""
    default = AttackSpec.model_fields[name].default
    return Field(default_factory=lambda: [default])


class AttackFactors(BaseModel):
    """Attacker choices; a list is a grid axis, a scalar is fixed, a factor left out is AttackSpec's default."""

    model_config = ConfigDict(extra="forbid")
    strategy: list[str] = _attack_default("strategy")
    strategy_options: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per strategy name")
    budget: list[int] = _attack_default("budget")
    arch: list[str] = _attack_default("arch")
    optimizer: list[str] = _attack_default("optimizer")
    lr: list[float | None] = _attack_default("lr")
    pretrained: list[bool | str] = _attack_default("pretrained")
    augment: list[bool] = _attack_default("augment")
    epochs: list[int] = _attack_default("epochs")
    seed: list[int] = _attack_default("seed")
    batch_size: int = Field(AttackSpec.model_fields["batch_size"].default, gt=1)
    targets: Literal["scores", "labels"] = Field(AttackSpec.model_fields["targets"].default,
                                                 description=AttackSpec.model_fields["targets"].description)

    @field_validator("strategy", "budget", "arch", "optimizer", "lr", "pretrained", "augment", "epochs", "seed",
                     mode="before")
    @classmethod
    def _as_list(cls, v: Any) -> list:
        return _listify(v)

    @field_validator("strategy")
    @classmethod
    def _strategies(cls, v: list[str]) -> list[str]:
        return [_known(ATTACKS, s) for s in v]

    @field_validator("arch")
    @classmethod
    def _archs(cls, v: list[str]) -> list[str]:
        return [_known(MODELS, a) for a in v]

    @field_validator("optimizer")
    @classmethod
    def _optimizers(cls, v: list[str]) -> list[str]:
        return [_known(OPTIMIZERS, o) for o in v]

    @field_validator("budget", "epochs")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        bad = [x for x in v if x <= 0]
        if bad:
            raise ValueError(f"must be positive, got {bad}")
        return v

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: list[float | None]) -> list[float | None]:
        bad = [x for x in v if x is not None and x <= 0]
        if bad:
            raise ValueError(f"learning rates must be positive (or null = the optimizer's paper default), got {bad}")
        return v

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: str, info: ValidationInfo) -> str:
        if v == "labels":
            refuse_label_targets(info.data.get("strategy", []))
        return v


def _known(registry, name: str) -> str:
    if name not in registry:
        raise ValueError(f"unknown {registry.kind} {name!r}; valid: {', '.join(registry.names())}")
    return name


class Distribution(BaseModel):
    """One Optuna search dimension: exactly one of the fields."""

    model_config = ConfigDict(extra="forbid")
    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    choice: list[Any] | None = None

    @model_validator(mode="after")
    def _one(self) -> "Distribution":
        given = [k for k, v in self.model_dump().items() if v is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of loguniform, uniform, randint, choice (got {given or 'none'})")
        return self


class Search(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["grid", "optuna"] = "grid"
    num_samples: int = Field(1, ge=1, description="optuna: number of trials (the trial budget)")
    metric: str = "fidelity"
    mode: Literal["max", "min"] = "max"
    space: dict[Literal["lr", "epochs", "budget", "optimizer", "arch", "augment"], Distribution] = Field(
        default_factory=dict, description="optuna: attacker hyper-parameters to search")

    @model_validator(mode="after")
    def _space_needs_optuna(self) -> "Search":
        if self.space and self.kind != "optuna":
            raise ValueError("a search space needs kind: optuna")
        if self.kind == "optuna" and not self.space:
            raise ValueError("kind: optuna needs a search space (e.g. lr: {loguniform: [1e-4, 1e-2]})")
        return self


class Asha(BaseModel):
    """ASHA early stopping on the per-epoch fidelity (needs ``eval_every_epoch``)."""

    model_config = ConfigDict(extra="forbid")
    grace_period: int = Field(2, ge=1)
    reduction_factor: float = Field(3.0, gt=1)


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cpus_per_trial: float = Field(1.0, gt=0)
    gpu_fraction: float = Field(0.5, gt=0, le=1, description="per trial, used only when the cluster has GPUs")
    victim_cpus: float = Field(0.0, ge=0, description="logical CPUs per victim replica on Serve (0: victims are "
                                                     "cheap next to training, and must not block trial slots)")
    victim_replicas: int = Field(1, ge=1)
    max_concurrent_trials: int | None = Field(None, ge=1)
    serve_resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources the sweep's "
                                              "Serve app asks for: places victims on labeled nodes")
    trial_resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources each trial "
                                              "asks for (besides its CPUs/GPU): places trials on labeled nodes")
    deploy_timeout_s: float = Field(600.0, gt=0, description="how long trials wait for the sweep's Serve app "
                                                            "(it deploys while Tune starts them)")
    keep_victims: bool = Field(False, description="serve the victims as a long-lived service: the app is named by "
                               "what it serves (victims, their bundles, policies, detectors, resources), left running "
                               "when the sweep ends, and joined by the next sweep that needs the same one on the same "
                               "cluster, which then skips Serve's start (~10 s here). Its query log is under "
                               "DME_HOME/serving/<app>; list or stop services with `dme services`")


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: SafeName
    description: str = ""
    plugins: list[str] = Field(default_factory=list, description=".py files or modules that register components "
                                                                 "(attacks, defenses, …) used by this sweep")
    experiment: str = Field("dme-sweeps", description="MLflow experiment")
    pool: list[str] = Field(["photos"], min_length=1, description="the attacker's unlabeled pool(s): a registered "
                            "pool, a dataset name or a path; a list is a grid axis (e.g. in-distribution vs natural)")
    pool_options: dict[str, Any] = Field(default_factory=dict, description="keyword options of the pool loader "
                                         "(e.g. {n: 2000}); with several pools, either options every pool takes or "
                                         "one mapping per pool name (e.g. {photos: {n: 2000}, digits-unseen: {}})")
    victims: list[VictimRef] = Field(default_factory=lambda: [VictimRef(name="digits")], min_length=1)
    policies: list[PolicySpec] = Field(["probabilities"], min_length=1, description="output policy chains (defenses)")
    detectors: list[DetectorSpec] = Field(default_factory=list, description="per-key detectors watching every victim "
                                          "deployment of the sweep, e.g. ['prada', 'ood-rate'] (action flag: they "
                                          "never change an answer); each trial reports whether and after how many "
                                          "queries its key was flagged, and the driver measures their false-positive "
                                          "rate on benign clients")
    benign_keys: int = Field(5, ge=0, description="benign clients per victim deployment for the detectors' "
                                                  "false-positive rate (each sends the victim's test images in its own "
                                                  "random order)")
    benign_queries: int = Field(1000, ge=1, description="test images each benign client sends, in batches of 20")
    attack: AttackFactors = Field(default_factory=AttackFactors)
    exclude: list[dict[str, Any]] = Field(default_factory=list, description="grid points to leave out: each entry "
                                          "maps factors to a value or a list of values, and a point that matches "
                                          "every factor of an entry is dropped (e.g. [{strategy: dfme, budget: "
                                          "2000}] when each strategy has its own budgets); grid search only")
    search: Search = Field(default_factory=Search)
    asha: Asha | None = None
    eval_every_epoch: bool = True
    adv_eval_samples: int | None = Field(200, gt=0)
    resources: Resources = Field(default_factory=Resources)
    retries: int = Field(1, ge=0, description="times a failed trial is retried")
    presets: dict[str, dict[str, Any]] = Field(default_factory=dict)
    paper: PaperTable | None = Field(None, description="the paper's reported values for the table this sweep "
                                                       "reproduces (dme report compares ours with them)")

    @model_validator(mode="before")
    @classmethod
    def _import_plugins(cls, data: Any) -> Any:
        """Plugins register names that the field validators below check: import them first."""
        if isinstance(data, dict) and data.get("plugins"):
            plugins = data["plugins"]
            if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
                raise ValueError(f"plugins must be a list of .py paths or module names, got {plugins!r}")
            try:
                load_plugins(plugins)
            except DmeError as e:
                raise ValueError(str(e)) from None
        return data

    @field_validator("exclude")
    @classmethod
    def _exclude_factors(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, entry in enumerate(v):
            unknown = [k for k in entry if k not in FACTORS]
            if unknown or not entry:
                raise ValueError(f"exclude[{i}] = {entry!r}: "
                                 f"{'unknown factor ' + ', '.join(map(repr, unknown)) if unknown else 'empty entry'}"
                                 f"; allowed factors: {', '.join(FACTORS)}")
        return v

    @field_validator("pool", mode="before")
    @classmethod
    def _pools_as_list(cls, v: Any) -> list:
        return _listify(v)

    @field_validator("pool")
    @classmethod
    def _known_pools(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"pool names must be unique, got {v}")
        return [cls._known_pool(p) for p in v]

    @staticmethod
    def _known_pool(v: str) -> str:
        from ..data import DATASETS, POOLS

        if v in POOLS or v in DATASETS or Path(v).expanduser().exists():
            return v
        raise ValueError(f"pool {v!r} is neither a registered pool ({', '.join(POOLS.names())}), a dataset name "
                         f"({', '.join(DATASETS.names())}) nor an existing path (a .npz, a Parquet pool directory "
                         f"from `dme pool build`, an ImageNet64 batch directory or an image folder); relative paths "
                         f"are read from {Path.cwd()}")

    def options_for(self, pool: str) -> dict[str, Any]:
        """The loader options of ``pool`` (see :func:`options_for_pool`)."""
        return options_for_pool(self.pool_options, self.pool, pool)

    @model_validator(mode="after")
    def _capabilities(self) -> "SweepSpec":
        for strategy in self.attack.strategy:
            cls = ATTACKS.get(strategy)
            try:
                cls(**self.attack.strategy_options.get(strategy, {}))
            except ValidationError as e:
                err = e.errors()[0]
                raise ValueError(f"attack.strategy_options.{strategy}.{'.'.join(map(str, err['loc']))} = "
                                 f"{err.get('input')!r}: {err['msg']} (options: {', '.join(cls.model_fields)})") \
                    from None
            for policy in self.policies:
                returns = parse_policy(policy).returns
                if returns not in cls.accepts:
                    raise ValueError(f"attack strategy {strategy!r} needs an API that returns "
                                     f"{' or '.join(cls.accepts)}, but policy {policy!r} returns {returns!r}: "
                                     f"drop one of them from the grid")
        per_pool = [k for k in self.pool_options if k in self.pool]
        if len(self.pool) > 1 and per_pool:
            shared = [k for k in self.pool_options if k not in self.pool]
            if shared or not all(isinstance(self.pool_options[k], dict) for k in per_pool):
                raise ValueError(f"pool_options mixes per-pool mappings ({', '.join(per_pool)}) with other keys "
                                 f"({', '.join(shared) or 'non-mapping values'}): give either options every pool "
                                 f"takes, or one mapping per pool name ({', '.join(self.pool)})")
        names = [v.name for v in self.victims]
        if len(set(names)) != len(names):
            raise ValueError(f"victim names must be unique, got {names}")
        if self.asha is not None and not self.eval_every_epoch:
            raise ValueError("asha needs eval_every_epoch: true (it stops trials on per-epoch fidelity)")
        if self.exclude:
            if self.search.kind != "grid":
                raise ValueError(f"exclude applies to grid sweeps only (search.kind is {self.search.kind!r}): "
                                 "narrow the search space instead")
            full = self._product()
            for i, entry in enumerate(self.exclude):
                if not any(_excluded(entry, point) for point in full):
                    axes = {k: sorted({str(p[k]) for p in full}) for k in entry}
                    raise ValueError(f"exclude[{i}] = {entry!r} matches no grid point (a typo?); the grid's values: "
                                     + "; ".join(f"{k}: {', '.join(vals)}" for k, vals in axes.items()))
            if not self.grid():
                raise ValueError("exclude leaves no grid point: every combination is excluded")
        return self

    def with_absolute_paths(self) -> "SweepSpec":
        """The spec with every relative path that exists here (``pool``, path-valued strategy options such as
        SwiftTheft's ``reference_data``) made absolute: trials run in Tune's trial folders (or on other nodes of a
        shared file system), where a relative path would point elsewhere. Registered names stay as they are."""

        def absolute(v: Any) -> Any:
            return str(Path(v).expanduser().resolve()) if isinstance(v, str) and Path(v).expanduser().exists() else v

        def paths(name: str) -> tuple[str, ...]:
            return ATTACKS.get(name).path_options if name in ATTACKS else ()

        options = {name: {k: absolute(v) if k in paths(name) else v for k, v in opts.items()}
                   for name, opts in self.attack.strategy_options.items()}
        attack = self.attack.model_copy(update={"strategy_options": options})
        plugins = [absolute(p) if p.endswith(".py") else p for p in self.plugins]
        return self.model_copy(update={"pool": [absolute(p) for p in self.pool], "attack": attack,
                                       "plugins": plugins})

    # ------------------------------------------------------------------ the grid
    def deployment_name(self, victim: str, policy: str) -> str:
        """The Serve victim name for one victim × policy pair (one deployment each, shared by all trials)."""
        i = self.policies.index(policy)
        return f"{victim}--p{i}"

    def pairs(self) -> list[tuple[str, str]]:
        """The (victim, policy) pairs some trial uses, in spec order: one Serve deployment, defense kit set and
        defender's cost each. ``exclude`` can leave pairs out; an Optuna search may sample any pair."""
        used = {(g["victim"], g["policy"]) for g in self.grid()} if self.search.kind == "grid" else None
        return [(v.name, p) for v in self.victims for p in self.policies if used is None or (v.name, p) in used]

    def policies_for(self, victim: str) -> list[str]:
        """The output policies some trial uses on ``victim``, in spec order (its share of :meth:`pairs`)."""
        return [p for name, p in self.pairs() if name == victim]

    def grid(self) -> list[dict[str, Any]]:
        """Every factor combination not in ``exclude``, in a stable order (one dict of FACTORS per trial)."""
        return [p for p in self._product() if not any(_excluded(e, p) for e in self.exclude)]

    def _product(self) -> list[dict[str, Any]]:
        a = self.attack
        axes = {"victim": [v.name for v in self.victims], "policy": self.policies, "pool": self.pool,
                "strategy": a.strategy, "budget": a.budget, "arch": a.arch, "optimizer": a.optimizer, "lr": a.lr,
                "pretrained": a.pretrained, "augment": a.augment, "epochs": a.epochs, "seed": a.seed}
        return [dict(zip(FACTORS, combo)) for combo in itertools.product(*(axes[k] for k in FACTORS))]


def _excluded(entry: dict[str, Any], point: dict[str, Any]) -> bool:
    """Whether a grid point has, for every factor of an ``exclude`` entry, its value or one of its listed values."""
    return all(any(matches({k: x}, point) for x in _listify(v)) for k, v in entry.items())


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["resources.trial_resources.trials=0.01", "attack.seed=[0,1]"]`` -> a nested override (values are JSON
    where they parse as JSON, strings otherwise), applied like a preset: what a cluster adds to a shipped sweep."""
    out: dict[str, Any] = {}
    for item in items or []:
        path, sep, raw = item.partition("=")
        if not sep or not path or any(not p for p in path.split(".")):
            raise DmeError(f"--set takes DOTTED.FIELD=VALUE (e.g. resources.max_concurrent_trials=4), got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise DmeError(f"--set {item!r} goes inside {p!r}, which an earlier --set made a value")
        node[leaf] = value
    return out


def parse_sweep(doc: dict[str, Any], preset: str | None = None, overrides: dict[str, Any] | None = None) -> SweepSpec:
    """Validate a sweep document (after applying ``preset``, then ``overrides``); errors name field, value and what
    is allowed."""
    if preset:
        presets = doc.get("presets") or {}
        if preset not in presets:
            raise DmeError(f"unknown preset {preset!r}; this sweep has: {', '.join(presets) or 'none'}")
        doc = deep_merge({k: v for k, v in doc.items()}, presets[preset])
    if overrides:
        doc = deep_merge(doc, overrides)
    try:
        return SweepSpec.model_validate(doc)
    except ValidationError as e:
        raise explain_validation_error(e, "sweep") from None


def load_sweep(path: str | Path, preset: str | None = None, overrides: dict[str, Any] | None = None) -> SweepSpec:
    return parse_sweep(read_yaml_mapping(path, "sweep file", "sweeps/quickstart.yaml"), preset, overrides)
