"""The search's sampler restores in step with the trials Tune restores (launch.tuner.VariantGenerator),
with Tune's own sampler and trial objects and the experiment state written as Tune writes it."""
import copy
import json
from pathlib import Path

from ray import tune
from ray.tune.experiment import Experiment, Trial
from ray.tune.utils.serialization import TuneFunctionEncoder

from raytrain.launch.tuner import VariantGenerator


def _trainable(config):
    pass


SPACE = {"optim.lr": tune.loguniform(1e-4, 1e-2), "model.depth": tune.grid_search([3, 4])}


def new_sampler(storage: Path) -> tuple[VariantGenerator, VariantGenerator]:
    """(the sampler as Tune pickles it with the search, before it is given the search; that sampler given it)."""
    pristine = VariantGenerator(max_concurrent=1, random_state=7)
    sampler = copy.deepcopy(pristine)
    sampler.add_configurations([Experiment("search", run=_trainable, config=SPACE, num_samples=2, storage_path=str(storage))])
    return pristine, sampler


def save_trials(folder: Path, trials: list[tuple[Trial, str]]) -> None:
    """The trials' states as TuneController.save_to_dir writes them, beside the sampler's."""
    folder.mkdir(exist_ok=True)
    trial_data = []
    for trial, status in trials:
        trial.set_status(status)
        trial_data.append(list(trial.get_json_state()))
    state = {"trial_data": trial_data, "runner_data": {}, "stats": {"start_time": 0.0}}
    (folder / "experiment_state-2026-12-04_23-00-00.json").write_text(json.dumps(state, cls=TuneFunctionEncoder))


def save_sampler(folder: Path, sampler: VariantGenerator) -> None:
    folder.mkdir(exist_ok=True)
    sampler.save_to_dir(str(folder), "2026-12-04_23-00-00")


def settings(trial: Trial) -> tuple:
    return trial.trial_id, json.dumps(trial.config, sort_keys=True)


def test_the_saved_sampler_does_not_change_as_trials_are_sampled(tmp_path):
    _, sampler = new_sampler(tmp_path / "results")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    sampler.save_to_dir(str(tmp_path / "a"), "s")
    first = sampler.next_trial()
    sampler.on_trial_complete(first.trial_id)
    sampler.next_trial()
    sampler.save_to_dir(str(tmp_path / "b"), "s")
    assert (tmp_path / "a" / "basic-variant-state-s.json").read_bytes() == (tmp_path / "b" / "basic-variant-state-s.json").read_bytes()


def test_a_search_whose_trial_state_is_a_step_behind_its_sampler_runs_the_next_trial(tmp_path):
    """The driver died after it sampled trial 1 and uploaded the sampler, before the trials' state
    that holds trial 1: Tune's sampler would wait for trial 1 forever, and never run its setting."""
    pristine, sampler = new_sampler(tmp_path / "results")
    reference = copy.deepcopy(sampler)
    reference.max_concurrent = 0
    expected = [reference.next_trial() for _ in range(4)]
    first = sampler.next_trial()
    sampler.on_trial_complete(first.trial_id)
    sampler.next_trial()
    save_sampler(tmp_path / "state", sampler)
    save_trials(tmp_path / "state", [(first, Trial.TERMINATED)])

    restored = copy.deepcopy(pristine)
    restored.restore_from_dir(str(tmp_path / "state"))
    following = restored.next_trial()
    assert following is not None
    assert settings(following) == settings(expected[1])
    assert restored.next_trial() is None  # max_concurrent 1: the trial just sampled is running


def test_a_search_whose_sampler_is_a_step_behind_its_trial_state_samples_no_trial_twice(tmp_path):
    """The driver died after it uploaded the trials' state that holds a running trial 1, before
    the sampler that sampled it: Tune's sampler would count trial 0 as running forever."""
    pristine, sampler = new_sampler(tmp_path / "results")
    reference = copy.deepcopy(sampler)
    reference.max_concurrent = 0
    expected = [reference.next_trial() for _ in range(4)]
    first = sampler.next_trial()
    save_sampler(tmp_path / "state", sampler)
    sampler.on_trial_complete(first.trial_id)
    second = sampler.next_trial()
    save_trials(tmp_path / "state", [(first, Trial.TERMINATED), (second, Trial.RUNNING)])

    restored = copy.deepcopy(pristine)
    restored.restore_from_dir(str(tmp_path / "state"))
    assert restored.next_trial() is None  # the second trial runs again, restored by Tune, not sampled
    restored.on_trial_complete(second.trial_id)
    rest = [restored.next_trial()]
    restored.on_trial_complete(rest[0].trial_id)
    rest.append(restored.next_trial())
    restored.on_trial_complete(rest[1].trial_id)
    assert [settings(trial) for trial in rest] == [settings(trial) for trial in expected[2:]]
    assert restored.next_trial() is None
    assert restored.is_finished()
