"""A sweep stays resumable when a later release adds fields to its spec or its trial context.

Tune refuses ``Tuner.restore(param_space=...)`` when the flattened keys of the new space differ from the saved one.
The sweep context rides in the space as one opaque :class:`TrialContext`, so its contents can grow; sweeps saved
before that (a nested ``ctx`` dict) are detected and resumed with their saved space. Real Tune on a private cluster,
with a one-line trainable: what is tested is Tune's restore path, not our trials.
"""

import pickle
import sys

import pytest

pytestmark = [pytest.mark.ray]


def _trainable(config):
    from ray import tune

    from distributed_me.sweep.trial import trial_context

    x = config["factors"]["seed"] if "factors" in config else config["x"]
    tune.report({"x": x, "fields": len(trial_context(config))})


@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    import ray.cloudpickle as cloudpickle

    from distributed_me.serving.runtime import init_ray, shutdown

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import a test module by name
    init_ray(num_cpus=1)
    yield
    if ray.is_initialized():
        shutdown()


def _fit(tmp_path, space):
    from ray import tune

    tuner = tune.Tuner(_trainable, param_space=space,
                       run_config=tune.RunConfig(name="s", storage_path=str(tmp_path), verbose=0))
    grid = tuner.fit()
    assert not grid.errors
    return tmp_path / "s"


def test_a_context_with_new_fields_restores_and_old_trials_keep_theirs(ray_cluster, tmp_path):
    from ray import tune

    from distributed_me.sweep.runner import _legacy_layout, _param_space
    from distributed_me.sweep.spec import parse_sweep

    spec = parse_sweep({"name": "s", "pool": "photos", "victims": [{"name": "digits", "source": "embedded"}],
                        "policies": ["probabilities"], "attack": {"strategy": "random", "budget": 60, "seed": [1, 2]}})
    path = _fit(tmp_path, _param_space(spec, {"spec": {"name": "s"}, "a": 1}))
    assert not _legacy_layout(path)
    grown = _param_space(spec, {"spec": {"name": "s", "detectors": ["prada"]}, "a": 1, "defense_costs": {}})
    grid = tune.Tuner.restore(str(path), _trainable, param_space=grown).fit()
    assert sorted(r.metrics["x"] for r in grid) == [1, 2]


def test_a_nested_dict_context_is_recognised_as_the_earlier_layout(ray_cluster, tmp_path):
    from ray import tune

    from distributed_me.sweep.runner import _legacy_layout

    path = _fit(tmp_path, {"x": tune.grid_search([1, 2]), "ctx": {"spec": {"name": "s"}, "a": 1}})
    assert _legacy_layout(path)
    # what the earlier layout could not do, and why the sweep keeps the saved space for it
    with pytest.raises(ValueError, match="param_space"):
        tune.Tuner.restore(str(path), _trainable,
                           param_space={"x": tune.grid_search([1, 2]), "ctx": {"spec": {"name": "s"}, "a": 1, "b": 2}})
    grid = tune.Tuner.restore(str(path), _trainable, param_space=None).fit()
    assert sorted(r.metrics["fields"] for r in grid) == [2, 2]  # the trials read the context they were created with


def test_an_unreadable_tuner_state_is_not_taken_for_the_earlier_layout(tmp_path):
    from distributed_me.sweep.runner import _legacy_layout

    (tmp_path / "tuner.pkl").write_bytes(pickle.dumps({"__flattened_param_space_keys": ["ctx", "factors/x"]}))
    assert not _legacy_layout(tmp_path)
    (tmp_path / "tuner.pkl").write_bytes(b"not a pickle")
    assert not _legacy_layout(tmp_path)
