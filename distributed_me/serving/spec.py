"""The victims-as-a-service spec: which victims to host, how to scale and batch them, and who may query them.

The same typed model is read from a Ray Serve config file (the ``args`` of the application whose ``import_path`` is
``distributed_me.serving.app:build_app``, so ``serve run deployments/local.yaml`` works) and by ``dme serve``. It is
validated before anything is deployed: a bad field is named with its value and what is allowed.

No Ray import here: the spec is plain data, checked on the laptop that writes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import DmeError, explain_validation_error
from ..spec_types import DetectorSpec, PolicySpec, SafeName, read_yaml_mapping

ALL_VICTIMS = "*"


class Autoscaling(BaseModel):
    """Ray Serve ``autoscaling_config`` (the fields this project uses; Serve's defaults for the rest)."""

    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(3.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    metrics_interval_s: float = Field(1.0, gt=0)
    look_back_period_s: float = Field(3.0, gt=0)

    @model_validator(mode="after")
    def _order(self) -> "Autoscaling":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})")
        return self


class DetectorRule(BaseModel):
    """A stateful per-key detector on one victim and what its flag does: ``flag`` (logged), ``degrade`` (the key's
    later answers go through the victim's ``degrade_policy``) or ``block`` (its later requests get 403)."""

    model_config = ConfigDict(extra="forbid")
    detector: DetectorSpec = Field(description="e.g. 'prada', 'prada:delta=0.9', 'ood-rate:threshold=0.4'")
    action: Literal["flag", "degrade", "block"] = "flag"


class VictimService(BaseModel):
    """One hosted victim: its bundle, its output policy (the defense), batching and scaling."""

    model_config = ConfigDict(extra="forbid")
    name: SafeName = Field(description="URL name: /v1/victims/{name}")
    source: str = Field("embedded", description="'embedded', a bundle folder, a registered name or models:/ URI")
    output_policy: PolicySpec = Field("probabilities", description="policy chain, e.g. 'round:2,topk:1'")
    policy_seed: int = Field(0, description="seed of randomized policies (noise); draws keyed per key and image")
    max_batch_size: int = Field(256, ge=1, description="images per forward pass (dynamic batching)")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="how long a batch waits to fill")
    num_replicas: int | None = Field(None, ge=1, description="fixed replica count (exclusive with autoscaling)")
    autoscaling: Autoscaling | None = None
    max_ongoing_requests: int = Field(32, ge=1)
    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica when the cluster has no GPU")
    gpu_fraction: float = Field(0.25, gt=0, le=1, description="GPU share per replica when the cluster has GPUs")
    detectors: list[DetectorRule] = Field(default_factory=list, description="per-key detectors and their actions")
    degrade_policy: PolicySpec = Field("label", description="the policy chain a key flagged by a 'degrade' rule "
                                       "gets instead of output_policy")

    @model_validator(mode="after")
    def _scaling(self) -> "VictimService":
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("give either num_replicas or autoscaling, not both")
        return self


class Client(BaseModel):
    """An API key: which victims it may query and how many images it may send to each (``None`` = unmetered)."""

    model_config = ConfigDict(extra="forbid")
    key: str = Field(min_length=8, description="the secret sent in the X-API-Key header")
    budget: int | None = Field(None, ge=0, description="images per victim; null = unlimited")
    victims: list[str] = Field(default_factory=lambda: [ALL_VICTIMS])

    def allows(self, victim: str) -> bool:
        return ALL_VICTIMS in self.victims or victim in self.victims


class ServeSpec(BaseModel):
    """Everything ``build_app`` needs. ``query_log`` is a folder of Parquet parts (one row per answered request)."""

    model_config = ConfigDict(extra="forbid")
    victims: list[VictimService] = Field(min_length=1)
    clients: list[Client] = Field(default_factory=list)
    query_log: str = Field("querylog/default", description="folder for the Parquet query log, usage and run-time "
                           "keys: an absolute path, or one relative to $DME_HOME (never to the working directory, "
                           "so a restart from anywhere finds the same budgets)")
    max_request_images: int = Field(4096, ge=1, description="largest batch one request may carry (else 413)")
    max_request_mb: float = Field(64.0, gt=0, description="largest request body in MiB (else 413, while streaming)")
    body_timeout_s: float = Field(30.0, gt=0, description="time a request body may take to arrive (else 408)")
    max_concurrent_per_key: int = Field(16, ge=1, description="requests in flight per key (else 429)")
    auth_cache_s: float = Field(10.0, ge=0, description="how long the ingress trusts a key it saw authorized")
    max_pending_key_checks: int = Field(64, ge=1, description="checks of keys the ingress replica never saw "
                                        "authorized, in flight per replica (else 503): a flood of wrong keys cannot "
                                        "queue up behind the accounting, nor keep out a good key whose trust expired")
    refund_window_s: float = Field(120.0, gt=0, description="how long after its charge an unanswered request can "
                                   "still be refunded (the ingress retries a refund for half of it)")
    log_flush_rows: int = Field(2048, ge=1, description="query-log rows buffered before a Parquet part is written")
    detector_snapshot_every: int = Field(50, ge=1, description="requests of a key between snapshots of its detector "
                                         "states (the journal in between is replayed after a restart)")
    detector_keys_in_memory: int = Field(256, ge=1, description="keys whose detector states the watch holds in "
                                         "memory at once (others are read back from disk on their next request)")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources every deployment "
                                        "of the app asks for, e.g. {victims: 0.01} keeps the whole service (victims, "
                                        "accounting, ingress) on the nodes that declare a 'victims' resource")

    @model_validator(mode="after")
    def _resources(self) -> "ServeSpec":
        bad = {k: v for k, v in self.resources.items() if v <= 0 or k.upper() in ("CPU", "GPU", "MEMORY")}
        if bad:
            raise ValueError(f"resources must be custom resource names with positive amounts (CPUs and GPUs are set "
                             f"per victim), got {bad}")
        return self

    @model_validator(mode="after")
    def _consistent(self) -> "ServeSpec":
        names = [v.name for v in self.victims]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"victim names must be unique; repeated: {', '.join(dup)}")
        keys = [c.key for c in self.clients]
        if len(set(keys)) != len(keys):
            raise ValueError("client keys must be unique")
        for c in self.clients:
            unknown = [v for v in c.victims if v != ALL_VICTIMS and v not in names]
            if unknown:
                raise ValueError(f"client key {c.key[:4]}… names unknown victims {unknown}; hosted: {names}")
        return self

    def query_log_path(self) -> Path:
        """``query_log`` as an absolute path: relative ones live under ``$DME_HOME``."""
        from ..tracking import dme_home

        path = Path(self.query_log).expanduser()
        return path if path.is_absolute() else dme_home() / path

    def victim(self, name: str) -> VictimService:
        for v in self.victims:
            if v.name == name:
                return v
        raise DmeError(f"no victim named {name!r}; hosted: {', '.join(v.name for v in self.victims)}")


def parse_serve_spec(args: dict[str, Any]) -> ServeSpec:
    """Validate ``args`` into a :class:`ServeSpec`; errors name the field, the bad value and what is allowed."""
    try:
        return ServeSpec.model_validate(args)
    except ValidationError as e:
        raise explain_validation_error(e, "serve spec") from None


def load_serve_config(path: str | Path) -> tuple[ServeSpec, dict[str, Any]]:
    """Read a Serve config YAML (``applications: [{import_path, args}]``, optional ``http_options``) or a bare spec.

    Returns the validated spec and the ``http_options`` (host/port) to start Serve with.
    """
    doc = read_yaml_mapping(path, "serve config", "deployments/local.yaml")
    http = dict(doc.get("http_options") or {})
    if "applications" in doc:
        apps = [a for a in doc["applications"] if str(a.get("import_path", "")).startswith("distributed_me.serving")]
        if len(apps) != 1:
            raise DmeError(f"serve config {path} must hold exactly one application with import_path "
                           "'distributed_me.serving.app:build_app'")
        args = apps[0].get("args") or {}
    else:
        args = doc
    return parse_serve_spec(args), http
