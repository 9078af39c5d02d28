"""nas.studyfile: a study file parsed, checked, stored with a study and compared with it."""

from __future__ import annotations

import dataclasses
import tomllib

import optuna
import pytest
from optuna.trial import TrialState

from nas.data import MEAN, STD, VALID_SIZE, DataConfig
from nas.space import SpaceConfig
from nas.study.create import enqueue_presets
from nas.studyfile import (DEFAULT_STUDY_FILE, KNOWN_SHAPES, ConfigError, RungConfig, StudyConfig, differences, load_study_config,
                           parse_study_config, resolve_study_file)
from tests.conftest import REPO_ROOT


def test_the_shipped_study_files_parse_and_round_trip_through_a_study():
    for path in sorted((REPO_ROOT / "studies").glob("*.toml")):
        config = load_study_config(path)
        assert StudyConfig.from_stored(config.to_stored()) == config, path.name


def test_the_shipped_study_files_enqueue_every_design_they_name(monkeypatch):
    """Each preset or design a shipped study file names lies within its space and budget, so that
    a fresh study queues it (a net outside is skipped with a note, and the study never runs it)."""
    monkeypatch.chdir(REPO_ROOT)  # design files are named relative to the repository
    for path in sorted((REPO_ROOT / "studies").glob("*.toml")):
        config = load_study_config(path)
        if not config.enqueue:
            continue
        study = optuna.create_study(directions=config.directions)
        notes = []
        enqueue_presets(study, config, config.enqueue, fresh=True, shape=KNOWN_SHAPES[config.data.dataset],
                        say=notes.append)
        assert notes == [], path.name
        assert len(study.get_trials(states=(TrialState.WAITING,))) == len(config.enqueue), path.name


REFERENCE = REPO_ROOT / "studies" / "reference.toml"


def test_the_reference_study_file_writes_out_every_key():
    written = tomllib.loads(REFERENCE.read_text())
    tables = {"rung": RungConfig, "space": SpaceConfig, "data": DataConfig}
    fields = {f.name for f in dataclasses.fields(StudyConfig)} - set(tables)
    assert set(written) == fields | set(tables)
    for table, cls in tables.items():
        assert set(written[table]) == {f.name for f in dataclasses.fields(cls)}, table


def test_the_reference_study_files_values_are_the_defaults():
    """As its header says: only `name` and `version` differ from what a file that leaves a key out
    gets; its [data] writes out what the defaults come to for MNIST (valid = 0 is refused)."""
    config = load_study_config(REFERENCE)
    expected = dataclasses.replace(StudyConfig(), name="reference", space=SpaceConfig(version=3),
                                   data=DataConfig(valid=10000, order="last", mean=(MEAN,), std=(STD,)))
    assert config == expected
    assert DataConfig().holdout_order == "last" and VALID_SIZE == 10000


def test_what_a_study_file_leaves_out_takes_the_documented_defaults():
    config = parse_study_config({"name": "tiny", "budget": 3000})
    assert (config.epochs, config.score_epochs, config.pruner, config.enqueue) == (15, 3, "rung", ("model3",))
    assert config.objectives == ("accuracy",) and config.directions == ["maximize"]
    assert config.space == SpaceConfig() and config.rung == RungConfig()


@pytest.mark.parametrize("data, message", [
    ({"budget": 0}, "must be positive"),
    ({"objectives": ["params"]}, "first objective must be accuracy"),
    ({"objectives": ["accuracy", "speed"]}, "objectives must be drawn from"),
    ({"pruner": "sometimes"}, "pruner must be one of"),
    ({"enqueue": ["model9"]}, "unknown presets"),
    ({"budget": 100}, "unreachable"),
    ({"colour": "blue"}, "colour"),
    ({"space": {"lr": 0.01}}, "take a list"),
])
def test_a_study_file_that_cannot_be_used_is_one_config_error_naming_its_source(data, message):
    with pytest.raises(ConfigError, match=message) as raised:
        parse_study_config(data, "my.toml")
    assert str(raised.value).startswith("my.toml: ") and "\n" not in str(raised.value)


def test_missing_and_malformed_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="study file not found"):
        load_study_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("budget = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_study_config(bad)


def test_resolve_study_file_prefers_the_flag_then_the_default_file_then_the_defaults(tmp_path, monkeypatch):
    own = tmp_path / "own.toml"
    own.write_text('name = "own"\nbudget = 6000\n')
    assert resolve_study_file(own).name == "own"
    monkeypatch.chdir(REPO_ROOT)
    assert resolve_study_file(None) == load_study_config(DEFAULT_STUDY_FILE)
    monkeypatch.chdir(tmp_path)  # no studies/ here: an installed nas outside a checkout
    assert resolve_study_file(None) == StudyConfig()


def test_differences_name_what_changed_except_name_enqueue_and_an_unused_rung():
    stored = parse_study_config({"name": "a", "pruner": "median"})
    assert differences(stored, dataclasses.replace(stored, name="b", enqueue=())) == []
    assert differences(stored, dataclasses.replace(stored, rung=RungConfig(epochs=3))) == []  # neither uses it
    changed = dataclasses.replace(stored, budget=5000, space=dataclasses.replace(stored.space, lr=(0.001, 0.05)))
    assert differences(stored, changed) == ["budget: 8000 stored, 5000 in the file",
                                            "space.lr: (0.0005, 0.05) stored, (0.001, 0.05) in the file"]
    with_rung = dataclasses.replace(stored, pruner="rung")
    assert "rung.epochs: 2 stored, 3 in the file" in differences(with_rung, dataclasses.replace(
        with_rung, rung=RungConfig(epochs=3)))
    before_the_margin = StudyConfig.from_stored({**with_rung.to_stored(), "rung": {"subset": 10000, "epochs": 2}})
    assert before_the_margin.rung.margin == 100.0  # the rule it ran under
    assert differences(before_the_margin, with_rung) == []  # and it resumes under the file's margin
    assert differences(with_rung, dataclasses.replace(with_rung, rung=RungConfig(margin=2.0))) == [
        "rung.margin: 1.0 stored, 2.0 in the file"]
