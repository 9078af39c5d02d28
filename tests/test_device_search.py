"""The trade-off a device has (issue 41): a stride-2 first conv and the input's side in the space,
counted and built alike; images resized once per side; the rung in two-objective studies; flash as
an objective; and a two-objective study of several sides end to end (search, replay, deploy,
confirm, export and warm start at each trial's side)."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import FixedTrial, TrialState
from PIL import Image

from nas.cli import confirm, deploy, replay, search
from nas.data import DataConfig, Split, cut, open_data
from nas.data.resize import SplitsBySize, resize_images, resized_data, resized_split
from nas.data.sources import Images
from nas.deployment import FP32_FILE, deployable, export_and_measure
from nas.model import build_model
from nas.space import Budget, SpaceConfig, draw, express, max_blocks, params_of, suggest
from nas.spec import MNIST_SHAPE, ArchSpec, BlockSpec, SpecError, TrainConfig, costs, count_params, layer_string, \
    layer_table, load_arch, receptive_field
from nas.study.create import create_or_load, warm_start
from nas.study.export import export_study
from nas.study.front_rung import goes_on_front, rivals
from nas.studyfile import ConfigError, StudyConfig, load_study_config, parse_study_config
from tests.test_space_v3 import conv_output_shapes, ptflops_macs

REPO_ROOT = Path(__file__).resolve().parent.parent
STUDIES = REPO_ROOT / "studies"
RAM_STUDY = STUDIES / "mnist-ram.toml"


@pytest.fixture(autouse=True)
def quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


# --- a net described in a space with a RAM budget -------------------------------------------------

def test_a_net_its_ram_budget_binds_is_described_at_its_share_of_that_budget():
    """`budget_fraction` scales widths against every budget at once, so a design's share is that of
    the budget it fills most: here 6,000 B of 8,192 B of RAM, not 1,092 of 8,000 params (a share
    that small would rebuild it narrower, and the study would skip it as outside its space)."""
    space = load_study_config(RAM_STUDY).space
    arch = ArchSpec(blocks=(BlockSpec((12,), padding=1), BlockSpec((8,))), input_size=20)
    assert (count_params(arch), costs(arch).peak_ram) == (1092, 6000)
    train = TrainConfig(epochs=15)
    ram = Budget(8000, peak_ram=8192, cost_model="mcunet")
    params = params_of(arch, train, space, ram)
    assert params["budget_fraction"] == pytest.approx(6000.5 / 8192)
    assert express(params, space, ram, 15, 0, MNIST_SHAPE)[1] == arch
    assert params_of(arch, train, space, 8000)["budget_fraction"] == pytest.approx(1092.5 / 8000)


# --- a stride-2 first conv ------------------------------------------------------------------------

STRIDED = [
    load_arch("studies/designs/sep-2k-s2.json")[0],
    ArchSpec(blocks=(BlockSpec((6, 8)), BlockSpec((12, 12), padding=1, op="sep", residual=True)), tail=(8,),
             first_kernel=5, first_stride=2, input_size=20),
    ArchSpec(blocks=(BlockSpec((8,), padding=1), BlockSpec((16,))), first_stride=2, input_size=13),  # odd side
    ArchSpec(blocks=(BlockSpec((4, 4), padding=1), BlockSpec((8,))), first_stride=2, input_size=14),
]


@pytest.mark.parametrize("arch", STRIDED, ids=layer_string)
def test_a_stride_2_first_conv_is_counted_as_pytorch_builds_it(arch):
    model = build_model(arch)
    assert count_params(arch) == sum(p.numel() for p in model.parameters())
    assert [r.out_shape for r in layer_table(arch)[:-1]] == conv_output_shapes(arch)[:-1]
    assert costs(arch).macs == ptflops_macs(arch)
    assert model[0].stride == (2, 2)


def test_a_stride_2_first_conv_quarters_the_maps_after_it():
    arch = STRIDED[0]  # sep-2k.json with a stride-2 first conv
    plain = dataclasses.replace(arch, first_stride=1)
    assert count_params(arch) == count_params(plain) and costs(arch).flash == costs(plain).flash
    table = layer_table(arch)
    assert table[0].out_shape == (8, 14, 14) and table[0].macs == 9 * 8 * 14 * 14
    # the peak: the first pointwise conv's input (14x14x8) and output (14x14x12), one byte a value
    assert costs(arch).peak_ram == 14 * 14 * 8 + 14 * 14 * 12 == 3920
    assert costs(plain).peak_ram == 15680
    assert [r.receptive_field for r in table[:3]] == [3, 7, 7]  # a 3x3 after the stride sees 2 + 2 * 2 more
    assert receptive_field(arch) > receptive_field(plain)


def test_a_stride_2_first_conv_is_written_read_and_named():
    arch = STRIDED[1]
    assert arch.to_dict()["first_stride"] == 2 and ArchSpec.from_dict(arch.to_dict()) == arch
    assert "first_stride" not in dataclasses.replace(arch, first_stride=1).to_dict()  # older specs read as before
    assert arch.version3 and layer_string(STRIDED[0]) == "8/2-12sp1 M 16s-16s+p1 M 20s"
    with pytest.raises(SpecError, match="first_stride"):
        count_params(dataclasses.replace(arch, first_stride=3))


def test_a_stride_2_first_conv_exports_to_onnx(tmp_path):
    import onnx

    arch = STRIDED[3]
    torch.manual_seed(0)
    model = build_model(arch).eval()
    images = torch.randint(0, 256, (64, 1, 14, 14), dtype=torch.uint8).numpy()
    measured = export_and_measure(deployable(model, (0.13,), (0.31,)), (1, 14, 14), calibration=images,
                                  eval_x=images, eval_y=np.zeros(64, dtype=np.int64), out=tmp_path, latency=False)
    assert measured.max_abs_difference < 1e-4
    convs = [n for n in onnx.load(str(tmp_path / FP32_FILE)).graph.node if n.op_type == "Conv"]
    assert [a.ints for a in convs[0].attribute if a.name == "strides"] == [[2, 2]]


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("padding", [0, 1])
def test_max_blocks_is_the_most_blocks_that_build(stride, kernel, padding):
    for size in range(6, 33):
        blocks = max_blocks(size, padding, 1, kernel, stride)

        def net(n: int) -> ArchSpec:
            return ArchSpec(tuple(BlockSpec((4,), padding if i == 0 else 0) for i in range(n)), input_size=size,
                            first_kernel=kernel, first_stride=stride)

        if blocks:
            count_params(net(blocks))
        with pytest.raises(SpecError):
            count_params(net(blocks + 1))


# --- the input's side and the stride in the space ---------------------------------------------------


def test_the_ram_study_draws_every_side_and_stride_and_builds_them_as_counted():
    config = load_study_config(RAM_STUDY)
    assert config.objectives == ("accuracy", "peak_ram") and config.pruner == "rung"
    assert config.space.image_sizes == (14, 20, 28) and config.space.first_stride == (1, 2)
    archs = draw(config.space, config.limits, 60, seed=1)
    assert {a.input_size for a in archs} == {14, 20, 28} and {a.first_stride for a in archs} == {1, 2}
    built = [a for a in archs if not config.limits.over(a)]
    assert len(built) >= 50
    for arch in built[:25]:
        assert [r.out_shape for r in layer_table(arch)[:-1]] == conv_output_shapes(arch)[:-1], layer_string(arch)


def test_a_trials_side_and_stride_are_params_it_is_rebuilt_from():
    """What replay, confirm and deploy rebuild (FixedTrial of the stored params) gives back the net
    the trial trained, at its side; a net worded afresh (params_of, a warm start's second try) says
    its side and stride. (params_of words widths as a share of the parameter budget, so it is
    checked where parameters alone bind and no block was capped.)"""
    config = load_study_config(RAM_STUDY)
    params_only = dataclasses.replace(config, max_peak_ram=0)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    worded = 0
    for _ in range(30):
        trial = study.ask()
        arch, train = suggest(trial, config.space, 15, 0, budget=config.limits)
        assert trial.params["image_size"] == arch.input_size and trial.params["first_stride"] == arch.first_stride
        assert suggest(FixedTrial(trial.params), config.space, 15, 0, budget=config.limits)[0] == arch
        arch, train = suggest(FixedTrial(trial.params), config.space, 15, 0, budget=params_only.limits)
        if not params_only.limits.over(arch) and len(arch.blocks) == trial.params["n_blocks"]:
            taken = express(params_of(arch, train, config.space, config.budget), config.space, params_only.limits,
                            15, 0)
            assert taken is not None and taken[1:] == (arch, train), layer_string(arch)
            worded += 1
    assert worded >= 10


def test_older_study_files_ask_neither_side_nor_stride():
    for name in ("mnist-2k.toml", "mnist-8k.toml", "mnist-8k-v3.toml"):
        config = load_study_config(STUDIES / name)
        assert config.space.image_sizes == () and config.space.first_stride == (1,)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for _ in range(10):
            trial = study.ask()
            arch, _ = suggest(trial, config.space, 15, 0, budget=config.limits)
            assert arch.input_size == 28 and arch.first_stride == 1
            assert not {"image_size", "first_stride"} & set(trial.params)
    stored = StudyConfig().to_stored()
    for key in ("image_sizes", "first_stride"):
        del stored["space"][key]  # a study stored before either existed
    assert StudyConfig.from_stored(stored) == StudyConfig()


@pytest.mark.parametrize(("space", "message"), [
    ({"version": 2, "first_stride": [1, 2]}, "first_stride is searched by space version 3"),
    ({"version": 3, "first_stride": [3]}, "first_stride takes choices"),
    ({"version": 3, "image_sizes": [14, 0]}, "image_sizes takes distinct positive"),
    ({"version": 3, "image_sizes": [14, 14]}, "image_sizes takes distinct positive"),
    ({"version": 3, "image_sizes": [4, 28], "layers": [2, 4], "first_padding": [0]}, "a 4x4 input is too small"),
])
def test_a_side_or_stride_the_space_cannot_take_is_one_error(space, message):
    with pytest.raises(ConfigError, match=message):
        parse_study_config({"budget": 8000, "space": space})


def test_flash_is_a_second_objective_and_a_ram_budget_holds_if_some_side_meets_it():
    assert parse_study_config({"objectives": ["accuracy", "flash"]}).directions == ["maximize", "minimize"]
    # a 4,000 B TFLM arena: no 28x28 net of this space fits (the smallest needs 5,848 B), a 14x14 one does (3,416 B)
    space = {"version": 3, "image_sizes": [14, 28], "first_padding": [1], "width": [4, 16]}
    assert parse_study_config({"budget": 2000, "max_peak_ram": 4000, "space": space}).max_peak_ram == 4000
    with pytest.raises(ConfigError, match="breaks a device budget"):
        parse_study_config({"budget": 2000, "max_peak_ram": 4000, "space": {**space, "image_sizes": [28]}})
    # the same holds in the count before TFLM (1,000 B: its first conv's output alone is 28x28x4)
    old = {"budget": 2000, "max_peak_ram": 1000, "cost_model": "mcunet"}
    assert parse_study_config({**old, "space": space}).max_peak_ram == 1000
    with pytest.raises(ConfigError, match="breaks a device budget"):
        parse_study_config({**old, "space": {**space, "image_sizes": [28]}})


# --- images resized once per side ---------------------------------------------------------------------


def test_images_are_resized_as_pil_resizes_a_folders_images(mnist):
    images = mnist.train_images[:100].unsqueeze(1)
    for size in (14, 20, 32):
        ours = resize_images(images, size)
        pil = np.stack([np.asarray(Image.fromarray(im[0].numpy()).resize((size, size), Image.Resampling.BILINEAR))
                        for im in images])
        assert ours.dtype == torch.uint8 and ours.shape == (100, 1, size, size)
        assert np.abs(ours[:, 0].numpy().astype(int) - pil).max() <= 1  # rounding apart
    assert resize_images(images, 28) is images


def test_a_search_resizes_its_split_once_per_side():
    x = torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8)
    split = Split(x, torch.zeros(10, dtype=torch.int64), x[:4], torch.zeros(4, dtype=torch.int64), "valid")
    sized = SplitsBySize(split)
    assert sized(28) is split
    small = sized(14)
    assert sized(14) is small and small.shape.size == 14 and small.eval_x.shape == (4, 1, 14, 14)
    assert small.train_y is split.train_y and small.mean == split.mean
    assert resized_split(split, 14).train_x.equal(small.train_x)


def test_data_resized_keeps_its_labels_and_parts():
    x = torch.randint(0, 256, (50, 1, 28, 28), dtype=torch.uint8)
    data = cut(Images(x, torch.arange(50) % 3, None, None, ("a", "b", "c")), DataConfig(dataset="npz", path="x"))
    small = resized_data(data, 20)
    assert {t.shape[1:] for t in (small.train_x, small.valid_x, small.test_x, small.rest_x)} == {(1, 20, 20)}
    assert small.train_y.equal(data.train_y) and small.test_y.equal(data.test_y)
    assert small.split("test").shape.size == 20


# --- the rung in two-objective studies -------------------------------------------------------------------


@pytest.mark.parametrize(("score", "cost", "others", "margin", "goes_on"), [
    (90.0, 500, [], 1.0, True),  # the first candidate: nothing to beat
    (90.0, 500, [(99.0, 900), (98.0, 501)], 1.0, True),  # only costlier trials beat it
    (90.0, 500, [(92.0, 400)], 1.0, False),  # a cheaper one beat it by more than the margin
    (91.0, 500, [(92.0, 400)], 1.0, True),  # by the margin exactly: it goes on
    (90.0, 500, [(91.5, 500)], 1.0, False),  # one of the same cost counts as no costlier
    (90.0, 500, [(85.0, 100), (93.0, 700)], 1.0, True),  # the cheaper one is worse
    (90.0, 500, [(85.0, 100), (91.5, 300), (99.0, 900)], 1.0, False),  # the best cheaper one decides
    (90.0, 500, [(90.5, 100)], 0.0, False),  # margin 0: any cheaper better one stops it
    (90.0, 500, [(99.0, 100)], 100.0, True),  # a margin of 100 points stops no one
])
def test_goes_on_front_case_by_case(score, cost, others, margin, goes_on):
    assert goes_on_front(score, cost, others, margin) is goes_on


def test_rivals_are_the_other_trials_that_ran_the_rung_with_their_cost():
    make = optuna.trial.create_trial
    trials = [make(state=TrialState.COMPLETE, values=[95.0, 300.0], user_attrs={"rung_acc": 93.0, "peak_ram": 300}),
              make(state=TrialState.PRUNED, user_attrs={"rung_acc": 80.0, "peak_ram": 200, "pruned_at": 0}),
              make(state=TrialState.PRUNED, user_attrs={"rejected": "over budget", "peak_ram": 100}),
              make(state=TrialState.COMPLETE, values=[97.0, 900.0], user_attrs={"peak_ram": 900}),  # never screened
              make(state=TrialState.RUNNING, user_attrs={"rung_acc": 91.0, "peak_ram": 400})]  # itself
    for number, trial in enumerate(trials):
        trial.number = number
    assert rivals(trials, 4, "peak_ram") == [(93.0, 300), (80.0, 200)]
    assert rivals(trials, 4, "flash") == []


RUNG_STUDY = """
name = "ram"
budget = 2000
epochs = 2
score_epochs = 1
objectives = ["accuracy", "peak_ram"]
enqueue = []

[rung]
subset = 64
epochs = 1
margin = {margin}

[space]
version = 3
image_sizes = [14, 20]
first_stride = [1, 2]
blocks = [2, 2]
layers = [1, 2]
width = [4, 12]
tail_layers = [0, 0]
"""


def run(url: str, study_file: Path, data_dir: Path, trials: int) -> None:
    assert search.main(["--trials", str(trials), "--epochs", "2", "--subset", "256", "--storage", url,
                        "--study-file", str(study_file), "--data-dir", str(data_dir), "--quiet"]) == 0


def test_a_cheaper_trial_that_beat_it_at_the_rung_stops_a_candidate(tmp_path, data_dir):
    """A rival that cost 1 byte and scored 100% at the rung: every candidate after it stops there,
    as a PRUNED trial without values or intermediate values, and the front is the rival alone."""
    study_file = tmp_path / "ram.toml"
    study_file.write_text(RUNG_STUDY.format(margin=1.0))
    config = load_study_config(study_file)
    url = f"sqlite:///{tmp_path / 'ram.db'}"
    study = create_or_load(optuna.storages.RDBStorage(url), "ram", config, seed=0, epochs=2, enqueue=())
    study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, values=[100.0, 1.0],
                                              user_attrs={"rung_acc": 100.0, "peak_ram": 1}))
    run(url, study_file, data_dir, 4)
    study = optuna.load_study(study_name="ram", storage=url)
    screened = [t for t in study.trials[1:] if "rejected" not in t.user_attrs]
    assert screened
    for t in screened:
        assert t.state == TrialState.PRUNED and t.values is None and not t.intermediate_values
        assert t.user_attrs["pruned_at"] == 0 and t.user_attrs["rung_acc"] < 99.0
        assert "epoch_acc" not in t.user_attrs and t.user_attrs["image_size"] in (14, 20)
    assert [t.number for t in study.best_trials] == [0]


@pytest.fixture(scope="module")
def sided_study(tmp_path_factory, data_dir):
    """A two-objective study (accuracy and flash) of two input sides, screened with a margin that
    stops no one: 4 trials, 2 epochs on 256 images."""
    root = tmp_path_factory.mktemp("sided")
    study_file = root / "ram.toml"
    study_file.write_text(RUNG_STUDY.format(margin=100.0).replace('"peak_ram"]', '"flash"]'))
    url = f"sqlite:///{root / 'ram.db'}"
    run(url, study_file, data_dir, 4)
    return url, optuna.load_study(study_name="ram", storage=url), root


def test_a_two_objective_study_screens_every_candidate_and_scores_its_second_objective(sided_study):
    _, study, _ = sided_study
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 4
    for t in done:
        assert t.values[1] == t.user_attrs["flash"] and "rung_acc" in t.user_attrs
        assert t.user_attrs["image_size"] == t.params["image_size"] == t.user_attrs["arch"]["input_size"]
        assert len(t.user_attrs["epoch_acc"]) == 2


def test_replay_deploy_and_confirm_run_at_the_trials_side(sided_study, data_dir, tmp_path, capsys):
    url, study, _ = sided_study
    trial = next(t for t in study.trials if t.state == TrialState.COMPLETE)
    side = trial.user_attrs["image_size"]
    common = ["--storage", url, "--study", "ram", "--data-dir", str(data_dir), "--quiet"]
    assert replay.main([*common, "--trial", str(trial.number), "--out", str(tmp_path / "m.pt")]) == 0
    assert "difference +0.0000 (identical)" in capsys.readouterr().out
    assert deploy.main([*common, "--trial", str(trial.number), "--out", str(tmp_path / "d")]) == 0
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    assert report["input"]["shape"] == ["N", 1, side, side] and report["arch"]["input_size"] == side
    assert confirm.main([*common, "--trials", str(trial.number), "--seeds", "1", "--epochs", "1",
                         "--out", str(tmp_path / "c.json")]) == 0
    results = json.loads((tmp_path / "c.json").read_text())
    assert {c["arch"]["input_size"] for c in results["candidates"] if c["label"] != "model3"} == {side}


def test_a_warm_start_carries_each_trial_at_its_side(sided_study):
    url, study, root = sided_study
    export = export_study(study)
    config = load_study_config(root / "ram.toml")
    fresh = optuna.create_study(directions=config.directions)
    added, skipped = warm_start(fresh, export, config)
    assert added == 4 and skipped == 0
    assert sorted(t.params["image_size"] for t in fresh.trials) == sorted(t.params["image_size"] for t in
                                                                           study.trials if t.state == TrialState.COMPLETE)


def test_the_report_draws_the_front_against_its_cost_and_labels_side_and_cost(sided_study):
    from nas.study.report import pareto_figure
    from nas.study.search import summary_lines
    from nas.study.trials import front_note, pareto_trials

    url, study, _ = sided_study
    front = pareto_trials(study)
    ax = pareto_figure(study).axes[0]
    assert ax.get_xlabel() == "flash (int8 weight bytes)"
    labels = [text.get_text() for text in ax.texts]
    for t in front:
        side = t.user_attrs["image_size"]
        assert any(label.startswith(f"#{t.number} ") and f"{t.user_attrs['flash']:,}" in label
                   and f"{side}px" in label for label in labels)
    lines = summary_lines(study, url)
    assert any("validation accuracy up, flash down" in line for line in lines)
    assert any("| side | stride | MACs | peak RAM B | flash B |" in line for line in lines)
    assert f"{front[0].user_attrs['flash']:,} B flash" in front_note(study, front[0], picked=True)


def test_the_reports_budget_line_is_the_studys_budget_of_that_cost(tmp_path):
    from nas.study.report import pareto_figure

    config = parse_study_config({"name": "r", "objectives": ["accuracy", "peak_ram"], "max_peak_ram": 8192})
    study = optuna.create_study(directions=config.directions)
    study.set_user_attr("config", config.to_stored())
    for number, (acc, ram) in enumerate([(97.0, 2000), (98.5, 5000), (96.0, 6000)]):
        study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, values=[acc, float(ram)],
                                                  user_attrs={"peak_ram": ram, "arch": {"input_size": 28}}))
    ax = pareto_figure(study).axes[0]
    assert [line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == ":"] == [8192]
    assert sorted(text.get_text().split()[0] for text in ax.texts) == ["#0", "#1"]
