"""nas.costmodel's 'tflm' count against TensorFlow Lite Micro itself: on a handful of draws of the
version-3 study files (plain, separable, residual), peak_ram is never below the arena TFLM's
interpreter needs and at most 10% + 1 KiB above it, its planned head is TFLM's to the byte, and
flash bounds the .tflite. And a study keeps the count it was made with."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from nas import costmodel
from nas.deployment import fold_batchnorm
from nas.model import build_model
from nas.space import Budget, draw
from nas.spec import PRESETS, ArchSpec, BlockSpec, count_params
from nas.studyfile import StudyConfig, differences, load_study_config

REPO_ROOT = Path(__file__).resolve().parent.parent


def measured(arch: ArchSpec) -> tuple[int, int, int]:
    """(TFLM's smallest arena, its planned head, the .tflite's bytes) of `arch` with random weights."""
    from nas import tflite, tflm

    torch.manual_seed(0)
    folded = fold_batchnorm(build_model(arch).eval())
    calibration = np.random.default_rng(0).integers(0, 256, (8, arch.in_channels, arch.input_size, arch.input_size),
                                                    dtype=np.uint8)
    _, model = tflite.convert(folded, (0.1307,), (0.3081,), calibration)
    arena = tflm.smallest_arena(model)
    return arena, tflm.allocations(model, arena).head, len(model)


def draws() -> list[ArchSpec]:
    archs = [PRESETS["model3"].arch,
             ArchSpec((BlockSpec((5, 5, 5), padding=1, op="sep", residual=True),), dw_norm=False, first_kernel=5)]
    for name in ("mnist-2k", "mnist-8k-v3"):
        config = load_study_config(REPO_ROOT / "studies" / f"{name}.toml")
        archs += draw(config.space, config.limits, 3, seed=11)
    # stride-2 first convs: padded ones get an explicit PAD (TFLite's SAME pads the other side)
    archs += [ArchSpec((BlockSpec((10, 10, 10), padding=1), BlockSpec((16, 16))), tail=(8,), first_stride=2),
              ArchSpec((BlockSpec((6, 8), padding=1, op="sep"), BlockSpec((10,))), first_kernel=5, first_stride=2,
                       input_size=20),
              ArchSpec((BlockSpec((6, 8)), BlockSpec((10,))), first_stride=2)]
    return archs


@pytest.mark.parametrize("arch", draws())
def test_peak_ram_bounds_the_tflm_arena_and_flash_the_file(arch):
    pytest.importorskip("tflite_micro")
    count_params(arch)
    arena, head, size = measured(arch)
    counted = costmodel.layout(arch)
    assert costmodel.greedy_plan(counted.buffers) == head  # TFLM's planner, simulated to the byte
    cost = costmodel.costs(arch, "tflm")
    assert arena <= cost.peak_ram <= 1.1 * arena + 1024
    assert size <= cost.flash <= 1.1 * size + 1024


def test_the_greedy_plan_reuses_memory_as_tflm_does():
    # a chain: each buffer is read only by the next op, so two at a time share the arena
    chain = tuple(costmodel.Buffer(size, i, i + 1) for i, size in enumerate((160, 320, 160, 80)))
    assert costmodel.greedy_plan(chain) == 160 + 320
    # all alive at once: nothing is shared
    assert costmodel.greedy_plan(tuple(costmodel.Buffer(s, 0, 9) for s in (16, 32, 48))) == 96


def test_counts_by_name_and_the_old_count_is_nas_spec():
    from nas.spec import costs as mcunet

    arch = PRESETS["model3"].arch
    assert costmodel.costs(arch, "mcunet") == mcunet(arch)
    tflm = costmodel.costs(arch)
    assert tflm.macs == mcunet(arch).macs and tflm.peak_ram > mcunet(arch).peak_ram and tflm.flash > 8122
    with pytest.raises(costmodel.CostModelError, match="unknown cost model 'onnx'"):
        costmodel.costs(arch, "onnx")


def test_a_budget_counts_with_its_model():
    arch = PRESETS["model3"].arch
    old, new = costmodel.costs(arch, "mcunet"), costmodel.costs(arch, "tflm")
    assert not Budget(8000, peak_ram=old.peak_ram, cost_model="mcunet").over(arch)
    broken = Budget(8000, peak_ram=old.peak_ram).over(arch)
    assert broken == [f"{new.peak_ram:,} peak RAM B > {old.peak_ram:,}"]


def test_a_stored_study_keeps_its_count():
    stored_before = StudyConfig().to_stored()
    del stored_before["cost_model"]  # as every study stored before 2026-12-07
    old = StudyConfig.from_stored(stored_before)
    assert old.cost_model == "mcunet" and old.limits.cost_model == "mcunet"
    new = StudyConfig()
    assert new.cost_model == "tflm" and StudyConfig.from_stored(new.to_stored()).cost_model == "tflm"
    assert differences(old, new) == []  # resuming it with its file is no change: it keeps "mcunet"
    assert differences(new, dataclasses.replace(new, max_peak_ram=16384)) == ["max_peak_ram: 0 stored, 16384 in the file"]


def test_resuming_a_study_made_before_says_its_count(tmp_path):
    import optuna

    from nas.study.create import create_or_load

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
    config = StudyConfig(enqueue=())
    study = create_or_load(storage, "old", config, seed=0, epochs=1, enqueue=())
    stored = dict(study.user_attrs["config"])
    del stored["cost_model"]
    study.set_user_attr("config", stored)  # as a study made before cost models had names stored it
    heard: list[str] = []
    create_or_load(storage, "old", config, seed=0, epochs=1, enqueue=(), say=heard.append)
    assert heard == ["note: study 'old' counts peak RAM and flash as 'mcunet' (nas.costmodel), the count it "
                     "was made with, not the file's 'tflm'"]
    storage.engine.dispose()
