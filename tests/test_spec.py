import json
import random

import pytest
import torch

from nas.model import BatchNormAct2d, build_model
from nas.spec import (
    PRESETS,
    ArchSpec,
    BlockSpec,
    SpecError,
    TrainConfig,
    count_params,
    layer_table,
    load_arch,
    receptive_field,
)

SEED_COUNTS = {"model1": 7224, "model2": 7838, "model3": 7918}

# Output shapes of every conv (and pool) in the seed's tables, in order.
SEED_SHAPES = {
    "model1": [(8, 26, 26), (16, 24, 24), (8, 22, 22), (8, 11, 11), (16, 9, 9), (8, 7, 7), (16, 5, 5), (8, 3, 3)],
    "model2": [(10, 26, 26), (10, 24, 24), (10, 22, 22), (10, 11, 11), (16, 9, 9), (16, 7, 7), (8, 5, 5),
               (8, 3, 3), (16, 3, 3)],
    "model3": [(10, 28, 28), (10, 28, 28), (10, 28, 28), (10, 14, 14), (16, 12, 12), (16, 10, 10), (8, 8, 8),
               (8, 6, 6), (8, 6, 6), (16, 6, 6)],
}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_counts_match_seed_and_pytorch(name):
    arch = PRESETS[name].arch
    model = build_model(arch)
    assert count_params(arch) == SEED_COUNTS[name]
    assert sum(p.numel() for p in model.parameters()) == SEED_COUNTS[name]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_shapes_match_seed_layer_by_layer(name):
    rows = [r.out_shape for r in layer_table(PRESETS[name].arch) if r.name in ("conv3x3", "conv1x1", "maxpool")]
    assert rows == SEED_SHAPES[name]


@pytest.mark.parametrize("name", PRESETS)
def test_analytic_shapes_equal_pytorch_shapes(name):
    arch = PRESETS[name].arch
    model = build_model(arch)
    shapes = []
    x = torch.zeros(1, 1, 28, 28)
    for layer in model:
        x = layer(x)
        if isinstance(layer, (BatchNormAct2d, torch.nn.MaxPool2d)):
            shapes.append(tuple(x.shape[1:]))
    # BatchNorm+ReLU after each conv of the features, then pools: match analytic conv/pool rows
    analytic = [r.out_shape for r in layer_table(arch) if r.name in ("conv3x3", "conv1x1", "maxpool")]
    assert shapes == analytic


def random_spec(rng: random.Random) -> ArchSpec:
    blocks = tuple(
        BlockSpec(tuple(rng.randint(1, 24) for _ in range(rng.randint(1, 3))), padding=rng.randint(0, 1))
        for _ in range(rng.randint(1, 3))
    )
    tail = tuple(rng.randint(1, 24) for _ in range(rng.randint(0, 2)))
    return ArchSpec(blocks=blocks, tail=tail, dropout=rng.choice([0.0, 0.1]))


def test_analytic_count_equals_pytorch_count_over_random_specs():
    rng = random.Random(0)
    checked = 0
    while checked < 200:
        spec = random_spec(rng)
        try:
            expected = count_params(spec)
        except SpecError:
            continue
        model = build_model(spec)
        assert expected == sum(p.numel() for p in model.parameters()), spec
        out = model(torch.zeros(2, 1, 28, 28))
        assert out.shape == (2, 10)
        checked += 1


def test_receptive_field_of_presets():
    # 3 convs (7), pool (8, jump 2), 4 convs (+16): the seed's "28x28" claim counts GAP, not convs.
    assert receptive_field(PRESETS["model3"].arch) == 24
    assert [r.receptive_field for r in layer_table(PRESETS["model1"].arch)][:4] == [3, 5, 7, 8]


@pytest.mark.parametrize(
    "spec, message",
    [
        (ArchSpec(blocks=(BlockSpec((8,) * 14),)), "shrinks below 1x1"),
        (ArchSpec(blocks=(BlockSpec((8, 8)), BlockSpec((8,) * 5), BlockSpec((8,)))), "shrinks below 1x1"),
        (ArchSpec(blocks=()), "at least one block"),
        (ArchSpec(blocks=(BlockSpec(()),)), "no conv layers"),
        (ArchSpec(blocks=(BlockSpec((8, 0)),)), "width below 1"),
        (ArchSpec(blocks=(BlockSpec((8,), padding=2),)), "padding"),
        (ArchSpec(blocks=(BlockSpec((8,)),), dropout=1.0), "dropout"),
    ],
)
def test_invalid_specs_are_rejected(spec, message):
    with pytest.raises(SpecError, match=message):
        count_params(spec)
    with pytest.raises(SpecError, match=message):
        build_model(spec)


@pytest.mark.parametrize("name", PRESETS)
def test_specs_round_trip_through_json(name):
    preset = PRESETS[name]
    arch = ArchSpec.from_dict(json.loads(json.dumps(preset.arch.to_dict())))
    train = TrainConfig.from_dict(json.loads(json.dumps(preset.train.to_dict())))
    assert arch == preset.arch and train == preset.train


def test_load_arch_reads_presets_and_files(tmp_path):
    assert load_arch("model3")[0] == PRESETS["model3"].arch
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(PRESETS["model2"].arch.to_dict()))
    assert load_arch(str(path)) == (PRESETS["model2"].arch, None)
    with pytest.raises(SpecError, match="neither a preset"):
        load_arch("model9")
    path.write_text("{not json")
    with pytest.raises(SpecError, match="not a valid spec file"):
        load_arch(str(path))


def test_presets_carry_the_seeds_training_configs():
    assert PRESETS["model1"].train.lr == 0.02 and PRESETS["model1"].train.batch_size == 128
    m3 = PRESETS["model3"].train
    assert (m3.lr, m3.scheduler, m3.step_size, m3.gamma, m3.batch_size, m3.epochs) == (0.005, "step", 8, 0.1, 64, 15)
