"""Space version 3: separable convs, residual adds and a 5x5 first conv, in the spec, the builder,
the cost model, the layer string, the summary, the deployment's folding and the search space."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import FixedTrial
from ptflops import get_model_complexity_info
from torch import nn

from nas.cli import space as space_cli
from nas.deployment import fold_batchnorm
from nas.model import Add, BatchNormAct2d, Residual, build_model, summary_table
from nas.space import SpaceConfig, draw, express, op_counts, params_for, params_of, suggest, upgraded
from nas.spec import (MNIST_SHAPE, PRESETS, ArchSpec, BlockSpec, SpecError, costs, count_params, layer_string, layer_table,
                      receptive_field)
from nas.studyfile import ConfigError, check_fits, load_study_config

REPO_ROOT = Path(__file__).resolve().parent.parent
STUDIES = REPO_ROOT / "studies"

# A net with every version-3 op: a padded 5x5 first conv, a separable residual block, a separable
# unpadded block, a tail.
EVERY_OP = ArchSpec(blocks=(BlockSpec((8, 12, 12), padding=1, op="sep", residual=True),
                            BlockSpec((16, 16), op="sep")), tail=(16,), first_kernel=5)


@pytest.fixture(autouse=True)
def quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def v3_draws(budget: int, n: int, seed: int) -> list[ArchSpec]:
    config = load_study_config(STUDIES / "mnist-2k.toml")
    return draw(config.space, budget, n, seed)


def ptflops_macs(arch: ArchSpec) -> int:
    macs, _ = get_model_complexity_info(
        build_model(arch), (arch.in_channels, arch.input_size, arch.input_size), as_strings=False,
        print_per_layer_stat=False, verbose=False, backend="pytorch",
        backend_specific_config={"count_functional": False},
        ignore_modules=[nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.BatchNorm2d, nn.ReLU, nn.Dropout2d, Add])
    return int(macs)


def conv_output_shapes(arch: ArchSpec) -> list[tuple[int, int, int]]:
    """Every conv's and pool's output shape as PyTorch runs the built model, in order."""
    model, shapes = build_model(arch).eval(), []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
             for m in model.modules() if isinstance(m, nn.Conv2d | nn.MaxPool2d | nn.AdaptiveAvgPool2d)]
    with torch.no_grad():
        model(torch.zeros(1, arch.in_channels, arch.input_size, arch.input_size))
    for hook in hooks:
        hook.remove()
    return shapes


def test_v3_ops_cost_what_pytorch_builds_on_a_hand_net_and_120_draws():
    archs = [EVERY_OP, dataclasses.replace(EVERY_OP, dw_norm=False)]
    for budget, seed in ((8000, 1), (2000, 2), (1000, 3)):
        archs += v3_draws(budget, 40, seed)
    assert {"conv5x5", "dwconv3x3", "pwconv1x1"} <= {row.name for a in archs for row in layer_table(a)}
    for arch in archs:
        model = build_model(arch)
        assert count_params(arch) == sum(p.numel() for p in model.parameters()), layer_string(arch)
        assert costs(arch).macs == ptflops_macs(arch), layer_string(arch)
        assert [r.out_shape for r in layer_table(arch)[:-1]] == conv_output_shapes(arch)[:-1], layer_string(arch)
        # flash: every conv weight a byte, a 4-byte bias for each BatchNorm folded into a conv
        weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
        biases = sum(4 * m.num_features for m in model.modules() if isinstance(m, BatchNormAct2d))
        assert costs(arch).flash == weights + biases


def test_every_op_net_by_hand():
    rows = layer_table(EVERY_OP)
    assert [r.name for r in rows] == ["conv5x5", "dwconv3x3", "pwconv1x1", "dwconv3x3", "pwconv1x1", "maxpool",
                                      "dwconv3x3", "pwconv1x1", "dwconv3x3", "pwconv1x1", "conv1x1", "gap",
                                      "classifier"]
    assert rows[0].params == 25 * 8 + 16 and rows[0].out_shape == (8, 28, 28)  # padded 5x5: pad 2
    assert rows[1].params == 9 * 8 + 16 and rows[2].params == 8 * 12 + 24
    # only the second separable conv keeps its input's shape (12 -> 12, padded): it adds its input,
    # which stays in RAM while the pointwise conv runs
    assert [r.residual for r in rows] == [False] * 4 + [True] + [False] * 8
    assert rows[4].activation_bytes == 12 * 784 + 12 * 784 + 12 * 784
    assert costs(EVERY_OP).peak_ram == 3 * 12 * 784 and costs(EVERY_OP).peak_layer == 4
    assert receptive_field(EVERY_OP) == 5 + 2 + 2 + 1 + 4 + 4
    assert layer_string(EVERY_OP) == "8k5-12s-12s+p1 M 16s-16s 1x1:16"
    linear = dataclasses.replace(EVERY_OP, dw_norm=False)
    assert layer_string(linear).endswith(" dwlin")
    assert count_params(EVERY_OP) - count_params(linear) == 2 * (8 + 12 + 12 + 16)  # no BatchNorm between


def test_residual_adds_its_input_after_the_relu():
    arch = ArchSpec(blocks=(BlockSpec((4, 4), padding=1, residual=True),), num_classes=2, input_size=6)
    model = build_model(arch).eval()
    residuals = [m for m in model if isinstance(m, Residual)]
    assert len(residuals) == 1  # the first conv changes the channels: no add there
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        assert torch.equal(residuals[0](x), x + residuals[0].body(x))


def test_unpadded_or_reshaping_convs_have_no_residual():
    # block 1 is unpadded: its maps shrink, no add; block 2's first conv goes 12 -> 16 channels, its
    # others keep the shape; a conv that keeps it across blocks (12 -> 12 after the pool) adds too
    arch = ArchSpec(blocks=(BlockSpec((8, 8, 12), padding=0, residual=True), BlockSpec((16, 16, 16), 1, "sep", True)))
    assert [r.residual for r in layer_table(arch) if r.name in ("conv3x3", "pwconv1x1")] == \
        [False, False, False, False, True, True]
    across = ArchSpec(blocks=(BlockSpec((8, 8, 12), padding=0), BlockSpec((12, 16), 1, "sep", True)))
    assert [r.residual for r in layer_table(across) if r.name == "pwconv1x1"] == [True, False]


def test_separable_blocks_build_depthwise_then_pointwise():
    model = build_model(EVERY_OP)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size[0], c.groups) for c in convs[:3]] == [(5, 1), (3, 8), (1, 1)]
    linear = build_model(dataclasses.replace(EVERY_OP, dw_norm=False))
    layers = list(linear)
    depthwise = next(i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d) and m.groups > 1)
    assert isinstance(layers[depthwise + 1], nn.Conv2d)  # straight into the pointwise conv


@pytest.mark.parametrize("arch", [EVERY_OP, dataclasses.replace(EVERY_OP, dw_norm=False, dropout=0.1)],
                         ids=["norm-between", "linear-dropout"])
def test_folding_keeps_a_v3_nets_outputs(arch):
    model = build_model(arch)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    model.eval()
    folded = fold_batchnorm(model)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d | nn.Dropout2d) for m in folded.modules())


def test_summary_shows_depthwise_convs_and_adds():
    table = summary_table(EVERY_OP)
    assert table.count("DepthwiseConv2d-") == 4
    assert table.count("Add-") == 1
    assert f"Total params: {count_params(EVERY_OP):,}" in table


def test_v3_fields_round_trip_and_older_specs_read_and_write_as_before():
    data = json.loads(json.dumps(EVERY_OP.to_dict()))
    assert ArchSpec.from_dict(data) == EVERY_OP
    model3 = PRESETS["model3"].arch.to_dict()
    assert set(model3) == {"blocks", "tail", "dropout", "in_channels", "input_size", "num_classes"}
    assert all(set(block) == {"widths", "padding"} for block in model3["blocks"])
    assert not PRESETS["model3"].arch.version3 and EVERY_OP.version3


@pytest.mark.parametrize("bad, message", [
    (dataclasses.replace(EVERY_OP, first_kernel=7), "first_kernel"),
    (ArchSpec(blocks=(BlockSpec((8,), op="mbconv"),)), "op must be"),
])
def test_bad_v3_fields_are_spec_errors(bad, message):
    with pytest.raises(SpecError, match=message):
        count_params(bad)


@pytest.mark.parametrize("name", PRESETS)
def test_the_seeds_models_rebuild_exactly_in_the_8k_v3_study(name):
    config, preset = load_study_config(STUDIES / "mnist-8k-v3.toml"), PRESETS[name]
    assert config.space.version == 3
    params = params_for(preset, config.space, config.budget)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        arch, train = suggest(FixedTrial(params), config.space, preset.train.epochs, 0, config.budget)
    assert (arch, train) == (preset.arch, preset.train)


def test_v3_params_rebuild_the_same_candidate_and_any_draw_rewords_through_params_of():
    config = load_study_config(STUDIES / "mnist-2k.toml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=5))
    for _ in range(40):
        trial = study.ask()
        arch, train = suggest(trial, config.space, 15, 3, config.budget)
        assert suggest(FixedTrial(trial.params), config.space, 15, 3, config.budget) == (arch, train)
        taken = express(params_of(arch, train, config.space, config.budget), config.space, config.limits, 15, 3)
        assert taken is not None and taken[1:] == (arch, train), layer_string(arch)


def test_a_version_2_trial_upgraded_rebuilds_its_net_in_version_3():
    v2 = load_study_config(STUDIES / "mnist-5k.toml")
    v3 = dataclasses.replace(v2.space, version=3, width=(4, 32))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=2))
    for _ in range(30):
        trial = study.ask()
        drawn = suggest(trial, v2.space, 15, 0, 5000)
        assert suggest(FixedTrial(upgraded(trial.params, v3)), v3, 15, 0, 5000) == drawn


@pytest.mark.parametrize("name", ["mnist-2k.toml", "mnist-1k.toml"])
def test_the_small_studies_sample_separable_convs_and_count_each_op(name, capsys):
    assert space_cli.main(["--sample", "200", "--study-file", str(STUDIES / name)]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("draws using each op: "))
    counts = dict(part.rsplit(" ", 1) for part in line.removeprefix("draws using each op: ").split(", "))
    assert int(counts["separable 3x3"]) > 50 and int(counts["residual"]) > 20 and int(counts["5x5 first conv"]) > 50
    assert "s-" in out or "s " in out  # an example layer string with a separable conv


def test_op_counts_count_draws_not_layers():
    plain = PRESETS["model3"].arch
    counts = op_counts([plain, EVERY_OP, EVERY_OP])
    assert counts == {"plain 3x3 (after the first conv)": 1, "separable 3x3": 2, "residual": 2, "5x5 first conv": 2,
                      "separable without BN between": 0}


def test_v3_smallest_net_is_separable_so_a_tiny_budget_is_not_refused_for_plain_convs(tmp_path):
    # the smallest 2-block net of 2+2 convs, 2 wide: 132 params separable, 162 plain
    path = tmp_path / "tiny.toml"
    path.write_text('budget = 150\n[space]\nversion = 3\nwidth = [2, 32]\nlayers = [2, 3]\ntail_layers = [0, 0]\n')
    check_fits(load_study_config(path), MNIST_SHAPE, str(path))
    path.write_text(path.read_text() + 'ops = ["conv"]\n')
    with pytest.raises(ConfigError, match="smallest architecture in the search space has 162 parameters"):
        check_fits(load_study_config(path), MNIST_SHAPE, str(path))


def test_a_design_file_in_enqueue_runs_first_once_and_as_designed(tmp_path, data_dir):
    from nas.cli import search
    from nas.spec import load_arch

    url = f"sqlite:///{tmp_path / 'd.db'}"
    argv = ["--epochs", "1", "--subset", "256", "--storage", url, "--study-file", str(STUDIES / "mnist-2k.toml"),
            "--data-dir", str(data_dir), "--quiet", "--workers", "1"]
    assert search.main(["--trials", "1", *argv]) == 0
    assert search.main(["--trials", "2", *argv]) == 0
    trials = optuna.load_study(study_name="mnist-2k", storage=url).trials
    designed = [t for t in trials if t.user_attrs.get("preset") == "studies/designs/sep-2k.json"]
    assert len(designed) == 1 and designed[0].number == 0
    arch, train = load_arch("studies/designs/sep-2k.json")
    assert ArchSpec.from_dict(designed[0].user_attrs["arch"]) == arch
    assert designed[0].user_attrs["train"]["lr"] == train.lr


@pytest.mark.parametrize("entry, message", [
    ("model9", "unknown presets"),
    ("missing.json", "neither a preset"),
    ("ARCH_ONLY", "has no \"train\" config"),
])
def test_a_bad_enqueue_entry_is_one_config_error(tmp_path, entry, message):
    from nas.studyfile import parse_study_config

    if entry == "ARCH_ONLY":
        entry = str(tmp_path / "arch.json")
        Path(entry).write_text(json.dumps(EVERY_OP.to_dict()))
    with pytest.raises(ConfigError, match=message):
        parse_study_config({"budget": 8000, "enqueue": [entry]})


def test_a_v3_net_exports_to_onnx_and_runs_as_in_pytorch(tmp_path):
    import numpy as np

    from nas.deployment import deployable, export_onnx, logits

    model = build_model(EVERY_OP).eval()
    module = deployable(model, (0.1307,), (0.3081,))
    export_onnx(module, (1, 28, 28), tmp_path / "m.onnx")
    images = np.random.default_rng(0).integers(0, 256, (8, 1, 28, 28), dtype=np.uint8)
    with torch.no_grad():
        expected = module(torch.from_numpy(images)).numpy()
    assert np.allclose(logits(tmp_path / "m.onnx", images), expected, atol=1e-4)


def test_the_ram_campaigns_confirmed_points_fit_its_budgets_and_train_at_their_side(data_dir, capsys):
    """studies/results/mnist-ram-test.json: the front points of studies/mnist-ram.toml confirmed on
    test over seeds 1-3 with int8 (ONNX Runtime and TFLM), each within the study's parameter and
    RAM budgets by the study's count, and trainable from the file at its own input side."""
    from nas.cli import train
    from nas.costmodel import costs
    from nas.studyfile import load_study_config

    path = STUDIES / "results" / "mnist-ram-test.json"
    results = json.loads(path.read_text())
    config = load_study_config(STUDIES / "mnist-ram.toml")
    points = [c for c in results["candidates"] if c["label"] != "model3"]
    assert len(points) == 3
    for point in points:
        arch = ArchSpec.from_dict(point["arch"])
        assert count_params(arch) == point["params"] < config.budget
        assert costs(arch, config.cost_model).peak_ram <= config.max_peak_ram
        assert arch.input_size in config.space.image_sizes and arch.first_stride in config.space.first_stride
        assert sorted(run["seed"] for run in point["runs"]) == [1, 2, 3]
        assert all(run["int8_acc"] and run["tflm_int8_acc"] for run in point["runs"])
    small = min(points, key=lambda c: costs(ArchSpec.from_dict(c["arch"]), config.cost_model).peak_ram)
    side = small["arch"]["input_size"]
    assert train.main(["--model", str(path), "--candidate", small["label"], "--epochs", "1", "--subset", "2000",
                       "--data-dir", str(data_dir), "--quiet"]) == 0
    out = capsys.readouterr().out  # seed 0 has no recorded run: the candidate, trained afresh
    assert f"{small['params']:,} params, {side}x{side} inputs" in out
    assert train.main(["--model", "model3", "--candidate", small["label"], "--data-dir", str(data_dir)]) == 2
    assert "needs a nas.confirm results file" in capsys.readouterr().err


# Each space-version-3 campaign's test confirm.
@pytest.mark.parametrize("name", ["mnist-2k-test.json", "mnist-1k-test.json", "mnist-5k-v3-test.json"])
def test_a_small_campaigns_winner_is_under_budget_with_3_seeds_and_trains(name, data_dir, capsys):
    from nas.cli import train

    path = STUDIES / "results" / name
    results = json.loads(path.read_text())
    budget = {"mnist-2k-test.json": 2000, "mnist-1k-test.json": 1000, "mnist-5k-v3-test.json": 5000}[name]
    winner = next(c for c in results["candidates"] if c["label"] == results["winner"])
    assert winner["params"] < budget and count_params(ArchSpec.from_dict(results["arch"])) == winner["params"]
    assert sorted(run["seed"] for run in winner["runs"]) == [1, 2, 3]
    assert train.main(["--model", str(path), "--epochs", "1", "--subset", "2000", "--data-dir", str(data_dir),
                       "--quiet"]) == 0
    assert f"{winner['params']:,} params" in capsys.readouterr().out
