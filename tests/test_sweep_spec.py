"""Sweep specs are validated before anything starts: good specs expand to the right grid, bad ones name the problem."""

import os
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from distributed_me.attacks import ATTACKS, QueryStrategy
from distributed_me.cli import main
from distributed_me.errors import DmeError
from distributed_me.spec_types import read_yaml_mapping
from distributed_me.sweep.spec import FACTORS, load_sweep, parse_sweep

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_grid():
    """The main job crosses what it teaches: pool (in-distribution vs natural), answers (full, label, a defense),
    two strategies and a budget curve; its smoke preset stays CI-sized."""
    spec = load_sweep(ROOT / "sweeps" / "quickstart.yaml")
    grid = spec.grid()
    assert len(grid) == 2 * 3 * 2 * 3 and all(set(g) == set(FACTORS) for g in grid)
    assert {(g["pool"], g["policy"], g["strategy"], g["budget"]) for g in grid} == {
        (p, d, s, b) for p in ("digits-unseen", "photos") for d in spec.policies
        for s in ("random", "activethief-kcenter") for b in (100, 300, 1000)}
    assert len({spec.deployment_name(g["victim"], g["policy"]) for g in grid}) == 3
    smoke = load_sweep(ROOT / "sweeps" / "quickstart.yaml", "smoke").grid()
    assert len(smoke) == 8 and {g["pool"] for g in smoke} == {"photos"}


def test_presets_merge_deeply():
    full = load_sweep(ROOT / "sweeps" / "mebench-optimizers.yaml", "full")
    small = load_sweep(ROOT / "sweeps" / "mebench-optimizers.yaml", "cpu-small")
    assert full.attack.optimizer == small.attack.optimizer == ["lion", "adamw", "adam", "sgd"]
    assert small.attack.arch == ["cnn32"] and small.attack.budget == [1000, 4000]
    assert full.attack.epochs == [200] and small.resources.gpu_fraction == full.resources.gpu_fraction
    assert len(full.grid()) == 4 * 3 * 3 and len(small.grid()) == 4 * 2


@pytest.mark.parametrize("doc,needle", [
    ({"attack": {"strategy": "nope"}}, "unknown attack strategy 'nope'; valid: "),
    ({"attack": {"optimizer": ["adam", "rmsprop"]}}, "unknown optimizer 'rmsprop'; valid: adam, adamw, lion, sgd"),
    ({"attack": {"arch": "resnet9000"}}, "unknown model 'resnet9000'"),
    ({"attack": {"budget": [100, 0]}}, "'attack.budget' = [100, 0]: must be positive"),
    ({"attack": {"lr": -1}}, "learning rates must be positive"),
    ({"policies": ["topk:0"]}, "'policies.0' = 'topk:0': output policy 'topk': field 'k'"),
    ({"policies": ["bogus"]}, "valid output policy names"),
    ({"search": {"kind": "optuna"}}, "needs a search space"),
    ({"search": {"space": {"lr": {"loguniform": [1e-4, 1e-2]}}}}, "needs kind: optuna"),
    ({"search": {"kind": "optuna", "space": {"lr": {}}}}, "exactly one of"),
    ({"asha": {}, "eval_every_epoch": False}, "asha needs eval_every_epoch"),
    ({"attack": {"strategy_options": {"random": {"bogus": 1}}}}, "attack.strategy_options.random.bogus"),
    ({"name": "has space"}, "'name'"),
    ({"budgets": [1]}, "'budgets'"),
])
def test_bad_specs_name_field_value_and_allowed(doc, needle):
    with pytest.raises(DmeError) as e:
        parse_sweep({"name": "t", **doc})
    assert needle in str(e.value)


class _NeedsScores(QueryStrategy):
    name: ClassVar[str] = "needs-scores-test"
    accepts: ClassVar[tuple[str, ...]] = ("probabilities",)


@pytest.fixture
def needs_scores():
    ATTACKS.register(_NeedsScores.name)(_NeedsScores)
    yield _NeedsScores.name
    ATTACKS._entries.pop(_NeedsScores.name)


def test_capability_mismatch_fails_at_validation(needs_scores):
    ok = parse_sweep({"name": "t", "attack": {"strategy": needs_scores}, "policies": ["probabilities", "round:2"]})
    assert len(ok.grid()) == 2
    with pytest.raises(DmeError, match=r"'needs-scores-test' needs an API that returns probabilities, but policy "
                                       r"'round:2,label' returns 'label'"):
        parse_sweep({"name": "t", "attack": {"strategy": needs_scores}, "policies": ["probabilities", "round:2,label"]})


def test_unknown_preset_lists_the_presets():
    with pytest.raises(DmeError, match="this sweep has: full, cpu-small"):
        load_sweep(ROOT / "sweeps" / "mebench-optimizers.yaml", "gpu-huge")


def test_cli_dry_run_and_errors(capsys, tmp_path):
    assert main(["sweep", str(ROOT / "sweeps" / "quickstart.yaml"), "--dry-run"]) == 0
    assert "36 trials" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nattack: {optimizer: rmsprop}\n")
    assert main(["sweep", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "rmsprop" in err and "Traceback" not in err
    assert main(["sweep", str(tmp_path / "missing.yaml")]) == 2
    assert "sweeps/quickstart.yaml" in capsys.readouterr().err


def test_unknown_pool_is_refused_naming_what_is_accepted(tmp_path):
    with pytest.raises(DmeError, match=r"pool 'nowhere/pool' is neither a registered pool .*dme pool build"):
        parse_sweep({"name": "p", "pool": "nowhere/pool"})
    assert parse_sweep({"name": "p", "pool": str(tmp_path)}).pool == [str(tmp_path)]
    with pytest.raises(DmeError, match=r"pool .*'nowhere/pool'"):  # every pool of a list is checked
        parse_sweep({"name": "p", "pool": ["photos", "nowhere/pool"]})
    with pytest.raises(DmeError, match=r"pool names must be unique"):
        parse_sweep({"name": "p", "pool": ["photos", "photos"]})


def test_relative_paths_become_absolute_before_trials(tmp_path, monkeypatch):
    """Trials run in Tune's trial folders, so the pool and path-valued strategy options (SwiftTheft's
    reference_data and features) are made absolute; registered names and other options are left alone."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "ref.npz").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    spec = parse_sweep({"name": "p", "pool": "data", "attack": {
        "strategy": ["swifttheft", "random"],
        "strategy_options": {"swifttheft": {"reference_data": "data/ref.npz", "features": "digits",
                                            "reference_arch": "data"}}}}).with_absolute_paths()
    assert spec.pool == [str(tmp_path / "data")]
    opts = spec.attack.strategy_options["swifttheft"]
    assert opts["reference_data"] == str(tmp_path / "data" / "ref.npz")
    assert opts["features"] == "digits"  # not an existing path: left for the strategy to resolve or refuse
    assert opts["reference_arch"] == "data"  # not a path option, even though a folder of that name exists
    assert parse_sweep({"name": "p"}).with_absolute_paths().pool == ["photos"]


SHARED_DATA = ROOT.parent / "shared" / "data"
SHIPPED_PRESETS = [(path, preset) for path in sorted((ROOT / "sweeps").glob("*.yaml"))
                   for preset in sorted(set(read_yaml_mapping(path, "sweep", "").get("presets", {})) - {"full"})]


@pytest.mark.parametrize("path,preset", SHIPPED_PRESETS, ids=[f"{p.stem}-{q}" for p, q in SHIPPED_PRESETS])
def test_shipped_sweeps_validate_with_their_cpu_presets(path, preset, monkeypatch):
    """Every shipped CPU preset is a valid spec with a non-empty grid (full presets need data this machine may lack:
    the swifttheft sweep's full pool is an ImageNet64 Parquet build, and its absence is a validation error)."""
    monkeypatch.chdir(ROOT)
    if preset.startswith("cpu-small") and not SHARED_DATA.is_dir():
        pytest.skip(f"preset {preset} reads {SHARED_DATA}, absent here")
    assert load_sweep(path, preset).grid()


def test_set_overrides_apply_after_the_preset_and_name_bad_input():
    from distributed_me.sweep.spec import load_sweep, parse_overrides

    over = parse_overrides(['resources.trial_resources={"trials": 0.01}', "attack.seed=[0, 1]", "name=q2"])
    spec = load_sweep(ROOT / "sweeps" / "quickstart.yaml", "smoke", over)
    assert spec.name == "q2" and spec.attack.seed == [0, 1] and spec.resources.trial_resources == {"trials": 0.01}
    assert spec.attack.epochs == [2]  # the preset still applies
    with pytest.raises(DmeError, match="DOTTED.FIELD=VALUE"):
        parse_overrides(["resources.max_concurrent_trials"])
    with pytest.raises(DmeError, match="max_concurrent_trials"):
        load_sweep(ROOT / "sweeps" / "quickstart.yaml", None, parse_overrides(["resources.max_concurrent_trials=0"]))


def test_kuberay_rayjob_runs_a_valid_sweep_whose_placement_the_cluster_can_satisfy():
    """deployments/kuberay-rayjob.yaml: its entrypoint is a `dme sweep` command line that parses and validates here,
    and every custom resource the sweep asks for (Serve app, trials) is declared by one of its worker groups."""
    import json
    import shlex

    from distributed_me.cli import build_parser
    from distributed_me.sweep.spec import load_sweep, parse_overrides

    job = yaml.safe_load((ROOT / "deployments" / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["dme", "sweep"]
    args = build_parser().parse_args(argv[1:])
    spec = load_sweep(ROOT / args.spec, args.preset, parse_overrides(args.set))
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["MLFLOW_TRACKING_URI"].startswith("http") and env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "1"
    declared: dict[str, float] = {}
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        raw = group["rayStartParams"].get("resources")
        for k, v in (json.loads(json.loads(raw)) if raw else {}).items():
            declared[k] = declared.get(k, 0) + v * group["replicas"]
    wanted = {**spec.resources.serve_resources, **spec.resources.trial_resources}
    assert wanted and set(wanted) <= set(declared), (wanted, declared)


def test_pool_options_are_shared_or_per_pool_never_mixed():
    two = {"name": "p", "pool": ["photos", "digits-unseen"]}
    spec = parse_sweep({**two, "pool_options": {"photos": {"n": 50}, "digits-unseen": {"variants": 2}}})
    assert spec.options_for("photos") == {"n": 50} and spec.options_for("digits-unseen") == {"variants": 2}
    assert parse_sweep({**two, "pool_options": {"seed": 3}}).options_for("photos") == {"seed": 3}  # shared
    assert parse_sweep({"name": "p", "pool_options": {"n": 50}}).options_for("photos") == {"n": 50}
    with pytest.raises(DmeError, match=r"pool_options mixes per-pool mappings \(photos\) with other keys \(n\)"):
        parse_sweep({**two, "pool_options": {"n": 2000, "photos": {"n": 50}}})


def test_progress_lines_carry_live_counts_and_the_status_line_each_running_trials_epoch():
    """The console's progress, driven as Tune drives it (no cluster needed): every line says how many trials are
    done, running and failed; the status line (terminals only) shows each running trial's epoch bar."""
    from types import SimpleNamespace

    from distributed_me.sweep.progress import TrialProgress, epoch_bar

    lines, status = [], []
    p = TrialProgress(3, lines.append, status.append)

    def trial(i: int, **kw):
        return SimpleNamespace(trial_id=f"trial_0000{i}", config={"factors": {"strategy": "random", "budget": 10 * i,
                                                                           "epochs": 4}}, **kw)

    a, b, c = trial(1, last_result={"fidelity": 0.5}), trial(2, error_msg="Traceback\nValueError: boom"), trial(3)
    for t in (a, b):
        p.on_trial_start(0, [], t)
    assert lines[-1] == "[0/3 done · 2 running · 0 failed] started  strategy=random budget=20"
    p.on_trial_result(0, [], a, {"epoch": 2})
    assert status[-1] == f"[0/3 done · 2 running · 0 failed] 00001 {epoch_bar(2, 4)}  00002 {epoch_bar(0, 4)}"
    assert epoch_bar(2, 4) == "[#####-----] 2/4"
    p.on_trial_complete(0, [], a)
    assert lines[-2:] == ["[1/3 done · 1 running · 0 failed] finished strategy=random budget=10",
                          lines[-1]] and lines[-1].strip().startswith("fidelity 0.5000")
    p.on_trial_error(0, [], b)
    p.on_trial_start(0, [], c)
    assert lines[-3:-1] == ["[2/3 done · 0 running · 1 failed] FAILED   strategy=random budget=20",
                            "         ValueError: boom"]
    assert lines[-1].startswith("[2/3 done · 1 running · 1 failed] started ")
    quiet = TrialProgress(1, lines.append)  # not a terminal: no status line at all
    quiet.on_trial_start(0, [], trial(4))
    quiet.on_trial_result(0, [], trial(4), {"epoch": 1})
    assert len(status) == 6  # two starts, an epoch, a finish, a failure, a start: none from the quiet one
    resumed = TrialProgress(5, lines.append)  # a resumed sweep: what finished before counts from the first step on
    resumed.on_step_begin(0, [trial(5, status="TERMINATED"), trial(6, status="TERMINATED"), trial(7, status="PENDING")])
    resumed.on_step_begin(1, [])  # only the first step counts
    resumed.on_trial_start(0, [], trial(7))
    assert lines[-1].startswith("[2/5 done · 1 running · 0 failed] started ")


def test_exclude_drops_exactly_the_matching_points_and_names_a_dead_entry():
    """Per-strategy budgets and paper-only cells without a second sweep: an exclude entry drops the points that match
    all its factors (a list means any of its values), nothing else; an entry that matches nothing is a typo."""
    doc = {"name": "x", "policies": ["probabilities", "label"],
           "attack": {"strategy": ["random", "knockoff"], "budget": [100, 300], "seed": [0, 1]},
           "exclude": [{"strategy": "random", "budget": 300}, {"policy": "label", "seed": [1]}]}
    grid = parse_sweep(doc).grid()
    full = {(p, s, b, r) for p in ("probabilities", "label") for s in ("random", "knockoff") for b in (100, 300)
            for r in (0, 1)}
    dropped = {k for k in full if (k[1], k[2]) == ("random", 300) or (k[0], k[3]) == ("label", 1)}
    assert {(g["policy"], g["strategy"], g["budget"], g["seed"]) for g in grid} == full - dropped
    assert len(grid) == 16 - 4 - 4 + 1  # (label, random, 300, seed 1) matches both entries
    with pytest.raises(DmeError, match=r"exclude\[0\].*matches no grid point.*budget: 100, 300"):
        parse_sweep({**doc, "exclude": [{"strategy": "random", "budget": 3000}]})
    with pytest.raises(DmeError, match=r"exclude\[0\].*unknown factor 'budgets'.*allowed factors: victim"):
        parse_sweep({**doc, "exclude": [{"budgets": 300}]})
    with pytest.raises(DmeError, match="leaves no grid point"):
        parse_sweep({**doc, "exclude": [{"seed": [0, 1]}]})


def test_only_the_victim_policy_pairs_some_trial_uses_are_deployed(tmp_path):
    """An excluded pair gets no Serve deployment (nor kits, nor a defender's cost): the advft sweep's CPU preset
    leaves AdvFT x DP / CIP out, and must not deploy and build CIP's kit for a victim no trial queries that way."""
    from distributed_me.sweep.service import serve_args

    doc = {"name": "x", "victims": [{"name": "plain", "source": "embedded"}, {"name": "prot", "source": "embedded"}],
           "policies": ["probabilities", "label", "topk:2"], "attack": {"budget": [100, 300]},
           "exclude": [{"victim": "prot", "policy": ["label", "topk:2"]}]}
    spec = parse_sweep(doc)
    assert spec.pairs() == [("plain", "probabilities"), ("plain", "label"), ("plain", "topk:2"),
                            ("prot", "probabilities")]
    assert spec.policies_for("prot") == ["probabilities"]
    assert spec.policies_for("plain") == ["probabilities", "label", "topk:2"]
    deployed = [v["name"] for v in serve_args(spec, tmp_path)["victims"]]
    assert deployed == ["plain--p0", "plain--p1", "plain--p2", "prot--p0"]
    assert {spec.deployment_name(g["victim"], g["policy"]) for g in spec.grid()} == set(deployed)


def test_the_attackers_targets_reach_every_trial_and_labels_are_refused_for_streaming_strategies():
    """``attack.targets`` is one choice for the whole sweep (not a factor): each trial's AttackSpec gets it, a context
    saved before the field existed means the default, and a grid that pairs ``labels`` with a strategy training on
    scores while it queries fails at validation, naming the field and the strategy."""
    from distributed_me.sweep.trial import attack_spec

    doc = {"name": "x", "victims": [{"name": "d", "source": "embedded"}], "policies": ["modelguard-w"],
           "attack": {"strategy": ["random", "knockoff"], "targets": "labels"}}
    spec = parse_sweep(doc)
    ctx = {"spec": spec.model_dump()}
    assert {attack_spec(ctx, f).targets for f in spec.grid()} == {"labels"}
    del ctx["spec"]["attack"]["targets"]  # a sweep started by an earlier distributed_me, resumed
    assert attack_spec(ctx, spec.grid()[0]).targets == "scores"
    with pytest.raises(DmeError, match=r"attack\.targets.*'labels' cannot apply to dfme"):
        parse_sweep({**doc, "attack": {"strategy": ["random", "dfme"], "targets": "labels"}})


def test_a_victim_service_is_named_by_what_it_serves_so_a_stale_one_is_never_joined(tmp_path):
    """The same victims, bundles and policies give the same service; another policy, or a bundle retrained in place
    (size or modification time), another one; without ``keep_victims`` the app is the sweep's own."""
    from distributed_me.sweep.service import victim_app

    bundle = tmp_path / "victim.pt"
    bundle.write_bytes(b"weights")
    doc = {"name": "s", "victims": [{"name": "v", "source": str(bundle)}], "policies": ["probabilities"],
           "resources": {"keep_victims": True}}
    spec = parse_sweep(doc)
    app = victim_app(spec, {"v": str(bundle)}, tmp_path)
    assert app.shared and app.name.startswith("victims-") and Path(app.args["query_log"]).is_absolute()
    assert victim_app(parse_sweep({**doc, "name": "other"}), {"v": str(bundle)}, tmp_path / "x").name == app.name
    assert victim_app(parse_sweep({**doc, "policies": ["label"]}), {"v": str(bundle)}, tmp_path).name != app.name
    os.utime(bundle, ns=(1, 1))
    assert victim_app(spec, {"v": str(bundle)}, tmp_path).name != app.name
    own = victim_app(parse_sweep({**doc, "resources": {}}), {"v": str(bundle)}, tmp_path)
    assert (own.name, own.shared, own.args["query_log"]) == ("sweep-s", False, str(tmp_path / "querylog"))
