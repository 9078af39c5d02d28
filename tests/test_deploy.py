"""python -m nas.deploy: BatchNorm folded exactly, ONNX Runtime's fp32 equal to PyTorch, an int8 model
smaller than the fp32 one and close to it in accuracy, and one line for each user mistake."""

import json
import shutil
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState
from torch import nn

from nas.cli import deploy
from nas.deployment import (C_HEADER, C_SOURCE, FP32_FILE, INT8_FILE, RawImages, calibration_images, deployable,
                            fold_batchnorm, int8_accuracy, tflm_accuracy)
from nas.model import BatchNormAct2d, build_model
from nas.space import SpaceConfig, suggest
from nas.spec import PRESETS, ArchSpec, BlockSpec

REPO_ROOT = Path(__file__).resolve().parent.parent


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking BatchNorm: statistics and affine parameters away from their defaults."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) * 2 - 1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=generator) - 0.5)
    return model.eval()


def drawn(count: int) -> list[ArchSpec]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    archs = []
    for _ in range(count):
        arch, _ = suggest(study.ask(), SpaceConfig(), 1, 0, budget=8000)
        archs.append(arch)
    return archs


WITH_TAIL_AND_DROPOUT = ArchSpec(blocks=(BlockSpec((6, 8), 1), BlockSpec((10,), 0)), tail=(12,), dropout=0.1)


@pytest.mark.parametrize("arch", [PRESETS[name].arch for name in PRESETS] + [WITH_TAIL_AND_DROPOUT] + drawn(5))
def test_folding_batchnorm_keeps_the_outputs_and_drops_batchnorm_and_dropout(arch):
    model = randomized(build_model(arch))
    folded = fold_batchnorm(model)
    x = torch.randn(8, arch.in_channels, arch.input_size, arch.input_size)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)
    kinds = {type(m) for m in folded}
    assert not kinds & {nn.BatchNorm2d, BatchNormAct2d, nn.Dropout2d}
    convs = [m for m in folded if isinstance(m, nn.Conv2d)]
    # the flash count's assumption: every conv but the classifier carries a bias after folding
    assert [m.bias is not None for m in convs] == [True] * (len(convs) - 1) + [False]


def test_deployable_takes_raw_uint8_images_and_leaves_the_model_alone():
    model = randomized(build_model(PRESETS["model3"].arch)).to(memory_format=torch.channels_last).train()
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    module = deployable(model, (0.1307,), (0.3081,))
    model.eval()
    with torch.no_grad():
        expected = model((images.float() / 255 - 0.1307) / 0.3081)
        assert torch.allclose(module(images), expected, atol=1e-5)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)  # a copy was folded


def test_calibration_is_a_fixed_draw_of_the_training_images():
    train_x = torch.arange(5000, dtype=torch.int32).view(-1, 1, 1, 1)
    first, again = calibration_images(train_x, 100), calibration_images(train_x, 100)
    assert np.array_equal(first, again) and len(set(first.ravel())) == 100
    assert len(calibration_images(train_x[:30], 100)) == 30


def test_model3_deploys_with_int8_smaller_and_close(tmp_path, data_dir, capsys):
    """The issue's must-show, as a test: a fp32 and a smaller int8 model, both accuracies printed and
    within a point of each other, the report complete."""
    out = tmp_path / "m3"
    assert deploy.main(["--model", "model3", "--epochs", "1", "--subset", "2000", "--out", str(out),
                        "--data-dir", str(data_dir), "--quiet"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert (out / INT8_FILE).stat().st_size < (out / FP32_FILE).stat().st_size
    written = [FP32_FILE, INT8_FILE, "model-int8.tflite", C_SOURCE, C_HEADER]
    assert report["files"] == {name: (out / name).stat().st_size for name in written}
    acc = report["accuracy"]
    assert acc["fp32"] > 20 and abs(acc["int8"] - acc["fp32"]) <= 1.0
    assert abs(acc["fp32"] - acc["pytorch"]) <= 0.02 and report["max_abs_difference"] < 1e-4
    assert f"fp32 {acc['fp32']:.2f}%, int8 {acc['int8']:.2f}%" in printed
    assert (report["params"], report["macs"], report["mcunet"]) == (7918, 2021056, {"peak_ram": 15680, "flash": 8122})
    # the TFLite file, measured in TFLM: within the cost model's bounds, the C source holding its bytes
    assert report["tflite_bytes"] == (out / "model-int8.tflite").stat().st_size <= report["flash"]
    assert report["tflm_arena_bytes"] <= report["peak_ram"] <= 1.1 * report["tflm_arena_bytes"] + 1024
    assert abs(report["tflm_accuracy"] - acc["int8"]) <= 1.5 and report["tflite"]["weight_bytes"] == 8122
    from nas import tflm

    assert tflm.bytes_of_c_array((out / C_SOURCE).read_text()) == (out / "model-int8.tflite").read_bytes()
    assert f"= {report['tflm_arena_bytes']};" in (out / C_HEADER).read_text()
    assert f"TFLM {report['tflm_accuracy']:.2f}%" in printed
    assert report["latency_ms_per_image"]["int8"] > 0 and report["cpu"] and report["test_images"] == 10000
    # the int8 file runs on its own, on raw pixels
    import onnxruntime as ort

    runner = ort.InferenceSession(str(out / INT8_FILE), providers=["CPUExecutionProvider"])
    assert runner.run(None, {"image": np.zeros((3, 1, 28, 28), np.uint8)})[0].shape == (3, 10)


def test_int8_accuracy_of_a_model_in_memory(mnist):
    """What confirm --int8 and an int8-scored study measure per run: fp32 and int8 on ONNX Runtime."""
    model = randomized(build_model(PRESETS["model1"].arch))
    x, y = mnist.test_images[:300].unsqueeze(1), mnist.test_labels[:300]
    fp32, int8 = int8_accuracy(model, (0.1307,), (0.3081,), mnist.train_images[:200].unsqueeze(1), x, y)
    with torch.no_grad():
        expected = 100.0 * float((RawImages(model, (0.1307,), (0.3081,))(x).argmax(1) == y).float().mean())
    assert fp32 == pytest.approx(expected, abs=0.34) and 0 <= int8 <= 100
    tflm = tflm_accuracy(model, (0.1307,), (0.3081,), mnist.train_images[:200].unsqueeze(1), x, y)
    assert abs(tflm - int8) <= 3.0  # 300 images: 3 points is 9 of them


def test_an_arena_too_small_and_tflite_micro_missing_are_one_line_each(tmp_path, data_dir, capsys, monkeypatch):
    common = ["--model", "model3", "--epochs", "1", "--subset", "256", "--data-dir", str(data_dir), "--quiet"]
    assert deploy.main(common + ["--out", str(tmp_path / "a"), "--arena", "16384"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the model needs a ") and "more than --arena 16,384" in err and err.count("\n") == 1
    assert (tmp_path / "a" / "model-int8.tflite").exists() and (tmp_path / "a" / "report.json").exists()

    import builtins

    real_import = builtins.__import__

    def without_tflm(name, *args, **kwargs):
        if name.startswith("tflite_micro"):
            raise ImportError(name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_tflm)
    assert deploy.main(common + ["--out", str(tmp_path / "b")]) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("model-int8.tflite")]
    assert lines == ['model-int8.tflite not written: TensorFlow Lite Micro is not installed (tflite_micro missing): '
                     'pip install "tflite-micro" "tflite"']
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["tflm_accuracy"] is None and report["tflite_bytes"] is None and (tmp_path / "b" / INT8_FILE).exists()


@pytest.fixture
def study_copy(searched, tmp_path):
    """The session's tiny study (with stored weights) copied, plus a rejected trial and a completed one
    without weights."""
    url, db = searched
    shutil.copy(db, tmp_path / "s.db")
    shutil.copytree(db.parent / "artifacts", tmp_path / "artifacts")
    copy_url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.load_study(study_name="mnist-8k", storage=copy_url)
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED,
                                              user_attrs={"rejected": "over budget: 9,100 params >= 8,000"}))
    done = [t for t in study.trials if t.state == TrialState.COMPLETE][0]
    attrs = {k: v for k, v in done.user_attrs.items() if k != "weights_artifact"}
    study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, value=10.0, params=done.params,
                                              distributions=done.distributions, user_attrs=attrs))
    return copy_url, tmp_path, len(study.trials)


def test_a_stored_trial_deploys_from_its_weights(study_copy, data_dir, capsys):
    url, tmp, _ = study_copy
    out = tmp / "t0"
    assert deploy.main(["--storage", url, "--study", "mnist-8k", "--trial", "0", "--out", str(out),
                        "--data-dir", str(data_dir), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "mnist-8k-trial0" and "stored" in report["trained"]
    assert abs(report["accuracy"]["fp32"] - report["accuracy"]["pytorch"]) <= 0.02


def test_user_mistakes_are_one_line(study_copy, data_dir, capsys):
    url, tmp, count = study_copy
    common = ["--storage", url, "--study", "mnist-8k", "--data-dir", str(data_dir), "--quiet"]
    (tmp / "a-file").write_text("")
    cases = [
        (["--trial", str(count - 2)], "was rejected (over budget: 9,100 params >= 8,000) and never trained"),
        (["--trial", str(count - 1)], f"trial {count - 1} has no stored weights"),
        (["--trial", "0", "--out", str(tmp / "a-file")], "is a file, not a directory"),
        (["--trial", "0", "--model", "model3"], "give one of them"),
        (["--trial", "0", "--artifact-dir", str(tmp / "nowhere")], "weights are not in"),
        (["--trial", "999"], "has no trial 999"),
    ]
    for extra, message in cases:
        assert deploy.main(common + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (extra, err)


def test_a_study_scored_on_int8_scores_each_trial_by_its_int8_model(tmp_path, data_dir, capsys):
    from nas.cli import search
    from nas.studyfile import ConfigError, load_study_config

    text = (REPO_ROOT / "studies" / "mnist-8k.toml").read_text().replace('enqueue = ["model3"]', "enqueue = []")
    path = tmp_path / "int8.toml"
    path.write_text(text.replace("score_epochs = 3", 'score_epochs = 3\nscore = "int8"', 1))
    assert load_study_config(path).score == "int8"
    url = f"sqlite:///{tmp_path / 'q.db'}"
    assert search.main(["--study-file", str(path), "--trials", "2", "--epochs", "2", "--subset", "256",
                        "--storage", url, "--data-dir", str(data_dir), "--quiet"]) == 0
    assert "int8 validation (mean of the last 2 epochs)" in capsys.readouterr().out
    trained = [t for t in optuna.load_study(study_name="mnist-8k", storage=url).trials
               if t.state == TrialState.COMPLETE]
    assert len(trained) == 2
    for t in trained:
        int8 = t.user_attrs["int8_acc"]
        assert len(int8) == 2 and t.value == pytest.approx(sum(int8) / 2)
        assert t.user_attrs["fp32_score"] == pytest.approx(sum(t.user_attrs["epoch_acc"]) / 2)
    path.write_text(text.replace("score_epochs = 3", 'score_epochs = 3\nscore = "int4"', 1))
    with pytest.raises(ConfigError, match="score must be one of"):
        load_study_config(path)
