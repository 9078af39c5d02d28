"""What a net costs a device, int8: MACs against ptflops, peak activation RAM as MCUNet defines it
for a sequential net, and flash with BatchNorm folded."""

from __future__ import annotations

import optuna
import pytest
from ptflops import get_model_complexity_info
from torch import nn

from nas import costmodel
from nas.cli import summary
from nas.model import BatchNormAct2d, build_model
from nas.space import Budget, SpaceConfig, draw
from nas.spec import PRESETS, ArchSpec, BlockSpec, costs, layer_table


def ptflops_macs(arch: ArchSpec) -> int:
    """Conv2d multiply-accumulates as ptflops counts them (functional ops, pooling, BatchNorm left out)."""
    macs, _ = get_model_complexity_info(
        build_model(arch), (arch.in_channels, arch.input_size, arch.input_size), as_strings=False,
        print_per_layer_stat=False, verbose=False, backend="pytorch",
        backend_specific_config={"count_functional": False},
        ignore_modules=[nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.BatchNorm2d, nn.ReLU, nn.Dropout2d])
    return int(macs)


def test_model3_costs_what_the_issue_states():
    model3 = costs(PRESETS["model3"].arch)
    assert model3.macs == 2_021_056
    assert model3.peak_ram == 15_680  # its second conv: a 28x28x10 input and a 28x28x10 output
    row = layer_table(PRESETS["model3"].arch)[model3.peak_layer]
    assert (row.name, row.in_shape, row.out_shape) == ("conv3x3", (10, 28, 28), (10, 28, 28))


def archs() -> list[ArchSpec]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    drawn = [a for a in draw(SpaceConfig(), 8000, 50, seed=3)]
    return [preset.arch for preset in PRESETS.values()] + drawn


def test_macs_match_ptflops_on_the_presets_and_50_draws():
    for arch in archs():
        assert costs(arch).macs == ptflops_macs(arch)


def test_flash_is_the_folded_weights_and_a_four_byte_bias_per_channel():
    for arch in archs()[:10]:
        model = build_model(arch)
        weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))
        biases = sum(4 * m.num_features for m in model.modules() if isinstance(m, BatchNormAct2d))
        assert costs(arch).flash == weights + biases


def test_peak_counts_pools_and_global_pooling():
    # one unpadded 3x3 conv of 1 channel on 4x4: its input 16 + output 4 = 20 is the peak; after a
    # 32-wide 1x1 tail, global pooling's input (2x2x32) + output (32) is
    small = ArchSpec(blocks=(BlockSpec((1,)),), input_size=4, num_classes=2)
    assert costs(small).peak_ram == 16 + 4
    wide = ArchSpec(blocks=(BlockSpec((1,)),), tail=(32,), input_size=4, num_classes=2)
    rows = layer_table(wide)
    assert costs(wide).peak_ram == max(r.activation_bytes for r in rows) == 2 * 2 * 32 + 32
    assert rows[costs(wide).peak_layer].name == "gap"


def test_summary_prints_the_costs(capsys):
    assert summary.main(["model3"]) == 0
    out = capsys.readouterr().out
    assert "MACs 2,021,056" in out and "peak activation memory 15,680 B" in out


def test_every_trained_trial_stores_its_costs(searched):
    study = optuna.load_study(study_name="mnist-8k", storage=searched[0])
    trained = [t for t in study.trials if "arch" in t.user_attrs]
    assert trained
    for t in trained:  # counted as the study counts (a new study: TFLM's, nas.costmodel)
        assert t.user_attrs["cost_model"] == "tflm"
        cost = costmodel.costs(ArchSpec.from_dict(t.user_attrs["arch"]), t.user_attrs["cost_model"])
        assert (t.user_attrs["macs"], t.user_attrs["peak_ram"], t.user_attrs["flash"]) == (
            cost.macs, cost.peak_ram, cost.flash)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_costs_are_positive_and_consistent(preset):
    arch = PRESETS[preset].arch
    cost = costs(arch)
    assert 0 < cost.flash < 4 * sum(r.params for r in layer_table(arch))
    assert cost.peak_ram >= max(r.activation_bytes for r in layer_table(arch))


# --- device budgets in the study file ---------------------------------------------------------------

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def device_study(tmp_path, extra: str, objectives: str = '["accuracy"]'):
    text = (REPO_ROOT / "studies" / "mnist-8k.toml").read_text()
    text = text.replace('enqueue = ["model3"]', "enqueue = []").replace(
        'objectives = ["accuracy"]', f"objectives = {objectives}")
    path = tmp_path / "device.toml"
    path.write_text(text.replace("budget = 8000", f"budget = 8000\n{extra}", 1))
    return path


def test_draws_fit_a_macs_budget_by_construction(tmp_path):
    from nas.studyfile import load_study_config

    config = load_study_config(device_study(tmp_path, "max_macs = 600000\nmax_peak_ram = 12000"))
    assert config.limits == Budget(8000, 600_000, 12_000, 0)
    archs = draw(config.space, config.limits, 200, seed=0)
    over = [a for a in archs if config.limits.over(a)]
    assert len(over) <= 20
    for arch in archs:
        if arch not in over:
            counted = costmodel.costs(arch, config.cost_model)  # TFLM's arena bound: a new study's count
            assert counted.macs <= 600_000 and counted.peak_ram <= 12_000


def test_a_device_budget_no_net_meets_is_refused_before_training(tmp_path):
    from nas.studyfile import ConfigError, load_study_config

    with pytest.raises(ConfigError, match="smallest architecture .* MACs"):
        load_study_config(device_study(tmp_path, "max_macs = 1000"))


def test_a_macs_study_trains_only_nets_within_it_and_can_minimize_macs(tmp_path, data_dir):
    from nas.cli import search

    url = f"sqlite:///{tmp_path / 'm.db'}"
    file = device_study(tmp_path, "max_macs = 600000", objectives='["accuracy", "macs"]')
    assert search.main(["--study-file", str(file), "--trials", "3", "--epochs", "1", "--subset", "256",
                        "--storage", url, "--data-dir", str(data_dir), "--quiet"]) == 0
    study = optuna.load_study(study_name="mnist-8k", storage=url)
    trained = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(trained) >= 3
    for t in trained:
        assert t.user_attrs["macs"] <= 600_000 and t.values[1] == t.user_attrs["macs"]
    for t in study.trials:
        if "rejected" in t.user_attrs:
            assert "MACs" in t.user_attrs["rejected"] or "params" in t.user_attrs["rejected"]
