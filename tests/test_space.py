"""nas.space: version 2 draws fit the budget by construction, presets stay expressible, stored
params rebuild what they trained (version 1's too), and `python -m nas.space --sample`."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.trial import FixedTrial

from nas.cli import space
from nas.studyfile import DEFAULT_STUDY_FILE, ConfigError, load_study_config, parse_study_config
from nas.space import SpaceConfig, draw, params_for, sample_report, suggest
from nas.spec import PRESETS, ArchSpec, BlockSpec, SpecError, count_params

OLD_STUDY = Path(__file__).parent / "fixtures" / "study-v0.json"  # written before space versions
MAX_REJECTED = 0.10


def study_file(tmp_path: Path, budget: int) -> Path:
    """The default study file with another budget, as a user would copy it."""
    path = tmp_path / f"mnist-{budget}.toml"
    path.write_text(DEFAULT_STUDY_FILE.read_text().replace("budget = 8000", f"budget = {budget}"))
    return path


def rejected(archs: list[ArchSpec], budget: int) -> int:
    def fits(arch: ArchSpec) -> bool:
        try:
            return count_params(arch) < budget
        except SpecError:
            return False

    return sum(1 for arch in archs if not fits(arch))


@pytest.fixture(autouse=True)
def quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize("name", PRESETS)
def test_presets_rebuild_exactly_in_the_default_study(name):
    config, preset = load_study_config(DEFAULT_STUDY_FILE), PRESETS[name]
    assert config.space.version == 2
    params = params_for(preset, config.space, config.budget)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # FixedTrial's "out of the range" is a failure here
        arch, train = suggest(FixedTrial(params), config.space, preset.train.epochs, 0, config.budget)
    assert (arch, train) == (preset.arch, preset.train)


def test_presets_over_a_smaller_budget_lie_outside_its_space():
    config = dataclasses.replace(load_study_config(DEFAULT_STUDY_FILE), budget=5000)
    params = params_for(PRESETS["model3"], config.space, config.budget)  # 7,918 params: over 5,000
    with pytest.warns(UserWarning, match="budget_fraction"):
        suggest(FixedTrial(params), config.space, 15, 0, config.budget)


@pytest.mark.parametrize("budget", [8000, 5000])
def test_random_draws_fit_the_budget(tmp_path, budget):
    config = load_study_config(study_file(tmp_path, budget))
    archs = draw(config.space, config.budget, 200, seed=0)
    assert rejected(archs, budget) <= MAX_REJECTED * len(archs)
    assert len(set(archs)) > 150  # and they are a search, not one net


@pytest.mark.parametrize("budget", [8000, 5000])
def test_tpe_draws_fit_the_budget_even_when_rewarded_for_size(tmp_path, budget):
    from nas.study.sampling import make_sampler

    config = load_study_config(study_file(tmp_path, budget))
    archs = []

    def biggest(trial: optuna.Trial) -> float:  # pulls the sampler towards the budget's edge
        archs.append(suggest(trial, config.space, 1, 0, config.budget)[0])
        try:
            return float(count_params(archs[-1]))
        except SpecError:
            raise optuna.TrialPruned() from None

    study = optuna.create_study(sampler=make_sampler(0), direction="maximize")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.optimize(biggest, n_trials=200)
    assert rejected(archs, budget) <= MAX_REJECTED * len(archs)
    assert study.best_value > 0.9 * budget


def test_version_1_draws_were_mostly_rejected():
    """Why version 2 exists, and a check that `rejected` counts what the search rejects."""
    config = load_study_config(DEFAULT_STUDY_FILE)
    archs = draw(dataclasses.replace(config.space, version=1), config.budget, 200, seed=0)
    assert rejected(archs, config.budget) > 0.5 * len(archs)


@pytest.mark.parametrize("version", [1, 2])
def test_stored_params_rebuild_the_same_candidate(version):
    config = load_study_config(DEFAULT_STUDY_FILE)
    space_ = dataclasses.replace(config.space, version=version)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(50):
        trial = study.ask()
        drawn = suggest(trial, space_, 15, 3, config.budget)
        assert suggest(FixedTrial(trial.params), space_, 15, 3, config.budget) == drawn


def test_trials_stored_before_versions_rebuild_what_they_trained():
    stored = json.loads(OLD_STUDY.read_text())
    old_space = SpaceConfig.from_dict(stored["user_attrs"]["config"]["space"])
    assert old_space.version == 1
    for trial in stored["trials"]:
        train = trial["user_attrs"]["train"]
        for budget in (None, 8000):  # passing the budget, as callers now do, changes nothing in version 1
            arch, config = suggest(FixedTrial(trial["params"]), old_space, train["epochs"], train["seed"], budget)
            assert arch == ArchSpec.from_dict(trial["user_attrs"]["arch"])
            assert config.to_dict() == train


def test_a_study_file_without_version_gets_the_current_space_and_a_stored_config_keeps_its_own():
    current = parse_study_config({"budget": 8000}).space
    assert current.version == 2
    assert SpaceConfig.from_dict({}).version == 1
    stored = json.loads(json.dumps(dataclasses.asdict(current)))  # as study.user_attrs["config"] holds it
    assert SpaceConfig.from_dict(stored) == current


def test_version_2_without_a_budget_says_so():
    with pytest.raises(ValueError, match="budget"):
        suggest(FixedTrial(params_for(PRESETS["model3"])), SpaceConfig(), 15, 0)


def test_throughput_study_still_draws_one_fixed_net():
    config = load_study_config(Path("studies/throughput.toml"))
    assert config.space.version == 1
    assert len(set(draw(config.space, config.budget, 5, seed=0))) == 1


@pytest.mark.parametrize("space_text, message", [
    ("version = 4", "version must be one of"),
    ("version = 3\nops = [\"conv\", \"mbconv\"]", "ops takes choices from"),
    ("version = 3\nfirst_kernel = [3, 7]", "first_kernel takes choices from"),
    ("budget_fraction = [0.0, 1.0]", "budget_fraction must be a range within"),
    ("relative_width = [0.5, 2.0]", "relative_width must be a range within"),
    ("relative_width = 0.5", "relative_width"),
])
def test_bad_version_2_ranges_are_config_errors(tmp_path, space_text, message):
    path = tmp_path / "bad.toml"
    path.write_text(f"budget = 8000\n[space]\n{space_text}\n")
    with pytest.raises(ConfigError, match=message):
        load_study_config(path)


def test_sample_report_counts_over_budget_and_invalid_apart():
    fits = ArchSpec(blocks=(BlockSpec((8,)), BlockSpec((8,))))
    over = ArchSpec(blocks=(BlockSpec((32, 32)), BlockSpec((32, 32))))
    invalid = ArchSpec(blocks=(BlockSpec((4,) * 4), BlockSpec((4,) * 4), BlockSpec((4,) * 4)))
    lines = sample_report([fits, over, invalid, fits], budget=8000)
    assert lines[0].startswith("over budget or invalid: 2 of 4 (50.0%); 1 over budget, 1 invalid")
    assert lines[-1].endswith(": 8 M 8") and lines.count(lines[-1]) == 1  # one example per distinct net


def test_sample_command_prints_share_spread_and_examples(tmp_path, capsys):
    path = study_file(tmp_path, 5000)
    assert space.main(["--sample", "40", "--study-file", str(path), "--seed", "2"]) == 0
    out = capsys.readouterr().out
    share = re.search(r"over budget or invalid: (\d+) of 40", out)
    assert share and int(share.group(1)) <= MAX_REJECTED * 40
    spread = re.search(r"parameters: +min ([\d,]+), median ([\d,]+), max ([\d,]+)", out)
    low, middle, high = (int(x.replace(",", "")) for x in spread.groups())
    assert low <= middle <= high < 5000
    assert re.search(r"receptive field: +min \d+, median \d+, max \d+", out)
    examples = out.split("examples:\n")[1].splitlines()
    assert 1 <= len(examples) <= 5 and all(" M " in line for line in examples)


@pytest.mark.parametrize("argv, message", [
    (["--sample", "0"], "--sample"),
    (["--sample", "x"], "--sample"),
    ([], "--sample"),
    (["--sample", "3", "--seed", "-1"], "--seed"),
])
def test_sample_command_bad_flags_are_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        space.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and message in err


def test_sample_command_missing_or_bad_study_file_is_one_line_and_exit_2(tmp_path, capsys):
    assert space.main(["--sample", "3", "--study-file", str(tmp_path / "none.toml")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'none.toml'}: study file not found\n"
    bad = tmp_path / "bad.toml"
    bad.write_text("budget = \n")
    assert space.main(["--sample", "3", "--study-file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not valid TOML" in err


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parent.parent / "studies").glob("*.toml")),
                         ids=lambda p: p.name)
def test_every_shipped_study_file_draws_within_ten_percent_over_budget(path, capsys):
    assert space.main(["--sample", "200", "--study-file", str(path)]) == 0
    first = capsys.readouterr().out.splitlines()[1]
    over = int(first.split("over budget or invalid: ")[1].split(" of")[0])
    assert over <= 20, first
