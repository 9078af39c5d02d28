"""The [data] table end to end: how data is cut and normalized, studies on other data (digits,
folders, npz), the identity a study keeps of its data, and one-line errors for bad data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from PIL import Image

from nas.cli import replay, search
from nas.cli import train as train_command
from nas.data import DATASETS, MEAN, SOURCES, STD, DataConfig, DataError, Split, cut, make_split, open_data
from nas.data.sources import Images
from nas.run.record import RunRecord
from nas.spec import PRESETS, Shape
from nas.studyfile import ConfigError, StudyConfig, check_fits, load_study_config, parse_study_config
from nas.train import train

REPO_ROOT = Path(__file__).resolve().parent.parent
DIGITS = REPO_ROOT / "studies" / "digits.toml"
MNIST_FILE = REPO_ROOT / "studies" / "mnist-8k.toml"


def images(n: int = 100, test: int | None = 20, channels: int = 1, size: int = 8, classes: int = 4) -> Images:
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=generator)
    y = torch.arange(n) % classes
    tx = None if test is None else torch.randint(0, 256, (test, channels, size, size), dtype=torch.uint8)
    ty = None if test is None else torch.arange(test) % classes
    return Images(x, y, tx, ty, tuple(f"c{k}" for k in range(classes)))


def study_file(tmp_path: Path, data: str, name: str = "s", extra: str = "") -> Path:
    """The digits study file with another name and [data] table."""
    text = DIGITS.read_text()
    head, rest = text.split("[data]", 1)
    space = rest[rest.index("[space]"):]
    path = tmp_path / f"{name}.toml"
    path.write_text(head.replace('name = "digits"', f'name = "{name}"') + extra + "\n[data]\n" + data + "\n" + space)
    return path


# --- cutting and normalizing ---------------------------------------------------------------------


def test_the_default_data_is_mnist_cut_as_before(mnist):
    split = make_split(mnist, "valid")
    assert split.train_x.dtype == torch.uint8 and split.train_x.shape == (50_000, 1, 28, 28)
    assert torch.equal(split.eval_x[:, 0], mnist.train_images[50_000:])
    # per batch, the same arithmetic the whole set was normalized with before (bit for bit)
    before = mnist.train_images[:500].unsqueeze(1).float().div_(255).sub_(MEAN).div_(STD)
    assert torch.equal(split.normalize(split.train_x[:500]), before)
    assert split.background() == float(before.min())
    test = make_split(mnist, "test")
    assert torch.equal(test.train_x[:, 0], mnist.train_images) and torch.equal(test.eval_y, mnist.test_labels)


def test_holdouts_are_counts_or_fractions_last_or_random_and_fixed():
    source = images(100, test=None)
    last = cut(source, DataConfig(dataset="npz", path="x", valid=10, test=0.2))
    assert (len(last.train_x), len(last.valid_x), len(last.test_x)) == (70, 10, 20)
    assert torch.equal(last.test_x, source.train_x[80:]) and torch.equal(last.valid_x, source.train_x[70:80])
    random = cut(source, DataConfig(dataset="digits", valid=0.125, test=20))
    again = cut(source, DataConfig(dataset="digits", valid=0.125, test=20))
    assert (len(random.train_x), len(random.valid_x), len(random.test_x)) == (70, 10, 20)
    assert torch.equal(random.valid_x, again.valid_x) and not torch.equal(random.test_x, last.test_x)
    parts = torch.cat([random.train_x, random.valid_x, random.test_x]).flatten(1)
    assert len(torch.unique(parts, dim=0)) == 100  # every image in exactly one part
    # a final run trains on everything but the test part, in the source's order, however validation was drawn
    other = cut(source, DataConfig(dataset="digits", valid=0.3, test=20))
    assert torch.equal(other.split("test").train_x, random.split("test").train_x)
    assert torch.equal(random.split("test").train_x, source.train_x[~torch.isin(torch.arange(100), held(random))])
    with pytest.raises(DataError, match="valid"):
        cut(source, DataConfig(dataset="digits", valid=80, test=20))


def held(data) -> torch.Tensor:
    """Indices (into the source's training images) of the test part: images are distinct, so match them."""
    flat = data.source.train_x.flatten(1)
    return torch.tensor([int((flat == image.flatten()).all(1).nonzero()[0]) for image in data.test_x])


def test_statistics_come_from_the_training_part_per_channel():
    source = images(60, channels=3)
    data = cut(source, DataConfig(dataset="npz", path="x", valid=10))
    pixels = data.train_x.double().div(255)
    assert data.mean == pytest.approx(pixels.mean(dim=(0, 2, 3)).tolist())
    assert data.std == pytest.approx(pixels.std(dim=(0, 2, 3), unbiased=False).tolist())
    split = data.split("valid")
    normalized = split.normalize(split.train_x)
    assert normalized.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert split.shape == Shape(3, 8, 4) and split.background().shape == (3, 1, 1)
    given = cut(source, DataConfig(dataset="npz", path="x", valid=10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    assert given.mean == (0.5, 0.5, 0.5)


def test_a_data_table_is_checked_as_it_is_read():
    for table, words in [({"dataset": "imagenet"}, "unknown dataset"), ({"dataset": "folder"}, "needs a path"),
                         ({"dataset": "mnist", "path": "x"}, "path is for"), ({"colour": 1}, "unknown keys"),
                         ({"dataset": "cifar10", "image_size": 16}, "folder"), ({"valid": 1.5}, "fraction"),
                         ({"dataset": "folder", "path": "p", "channels": 2}, "channels"),
                         ({"order": "shuffled"}, "order"), ({"mean": [0.5]}, "mean and std"),
                         ({"valid": 0}, "valid = 0 holds out no images"), ({"valid": 0.0}, "valid = 0 holds out"),
                         ({"valid": -5}, "valid must be a count")]:
        with pytest.raises(ConfigError, match=words):
            parse_study_config({"data": table})
    assert parse_study_config({}).data == DataConfig()


def test_every_dataset_has_one_reader():
    assert tuple(SOURCES) == DATASETS


def test_a_stored_data_table_reads_back_with_its_default_holdout():
    """A study stores every field, `valid = 0` where its file left valid out: that is no mistake."""
    stored = parse_study_config({"data": {"dataset": "digits"}}).to_stored()
    assert stored["data"]["valid"] == 0
    assert StudyConfig.from_stored(stored).data == DataConfig(dataset="digits")


def test_one_class_is_refused_whatever_the_source(tmp_path):
    with pytest.raises(DataError, match="every training image is labelled 'c0'; a classifier needs at least 2"):
        cut(images(classes=1), DataConfig(dataset="digits"))
    np.savez(tmp_path / "one.npz", x_train=np.zeros((50, 8, 8), np.uint8), y_train=np.zeros(50, np.int64))
    with pytest.raises(DataError, match=r"one.npz: every training image is labelled '0'"):
        open_data(DataConfig(dataset="npz", path=str(tmp_path / "one.npz")), tmp_path)
    # Two classes, sorted, with the last fifth held out: the training part is left with one.
    sorted_labels = Images(images(50, test=None).train_x, torch.tensor([0] * 40 + [1] * 10), None, None, ("a", "b"))
    with pytest.raises(DataError, match="once validation is held out, every training image left is labelled 'a'"):
        cut(sorted_labels, DataConfig(dataset="npz", path="p", valid=10, test=0.2, order="last"))
    assert len(cut(sorted_labels, DataConfig(dataset="npz", path="p", valid=10, test=0.2, order="random")).classes) == 2


def test_flips_are_a_data_choice_and_change_training():
    source = images(64, classes=2)
    arch = dataclasses.replace(PRESETS["model1"].arch, input_size=8, num_classes=2,
                               blocks=(dataclasses.replace(PRESETS["model1"].arch.blocks[0], padding=1),))
    config = dataclasses.replace(PRESETS["model1"].train, epochs=1, batch_size=16)
    runs = [train(arch, config, cut(source, DataConfig(dataset="npz", path="x", valid=8, flip=flip)).split(),
                  RunRecord(), progress=False).history[0].train_loss for flip in (False, True, False)]
    assert runs[0] == runs[2] != runs[1]


# --- studies on other data -----------------------------------------------------------------------


def test_the_space_adapts_to_small_inputs_and_refuses_too_small_ones():
    config = load_study_config(DIGITS)
    check_fits(config, Shape(1, 8, 10))
    unpadded = dataclasses.replace(config, space=dataclasses.replace(config.space, first_padding=(0,)))
    with pytest.raises(ConfigError, match="too small"):
        check_fits(unpadded, Shape(1, 2, 10))


def test_digits_searches_end_to_end_and_replays(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'd.db'}"
    assert search.main(["--study-file", str(DIGITS), "--trials", "3", "--epochs", "2", "--storage", url,
                        "--data-dir", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr()
    study = optuna.load_study(study_name="digits", storage=url)
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) >= 1
    identity = study.user_attrs["data"]
    assert identity["dataset"] == "digits" and identity["shape"] == [1, 8, 8] and len(identity["classes"]) == 10
    assert identity["split"] == {"train": 1007, "valid": 431, "test": 359, "order": "random"}
    for t in study.trials:
        if "arch" in t.user_attrs:
            assert (t.user_attrs["arch"]["input_size"], t.user_attrs["arch"]["num_classes"]) == (8, 10)
    assert "Traceback" not in out.err
    assert replay.main(["--storage", url, "--study", "digits", "--data-dir", str(tmp_path), "--quiet",
                        "--out", str(tmp_path / "r.pt")]) == 0
    assert "Test accuracy" in capsys.readouterr().out


def write_npz(path: Path, shift: int = 0) -> None:
    generator = np.random.default_rng(0)
    x = generator.integers(0, 256, (120, 8, 8), dtype=np.uint8)
    y = (np.arange(120) + shift) % 3
    np.savez(path, x_train=x[:100], y_train=y[:100], x_test=x[100:], y_test=y[100:])


def test_a_study_refuses_data_that_changed_under_it(tmp_path, capsys):
    npz = tmp_path / "d.npz"
    write_npz(npz)
    file = study_file(tmp_path, f'dataset = "npz"\npath = "{npz}"\nvalid = 20')
    url = f"sqlite:///{tmp_path / 's.db'}"
    common = ["--study-file", str(file), "--storage", url, "--data-dir", str(tmp_path), "--quiet", "--epochs", "1"]
    assert search.main(["--trials", "1", *common]) == 0
    write_npz(npz, shift=1)  # the same file name and sizes, other labels
    capsys.readouterr()
    assert search.main(["--trials", "2", *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other data" in err[0] and "fingerprint" in err[0]
    assert replay.main(["--storage", url, "--study", "s", "--data-dir", str(tmp_path), "--quiet"]) == 2
    assert "fingerprint" in capsys.readouterr().err
    write_npz(npz)
    assert search.main(["--trials", "2", *common]) == 0  # the data it was made on: it resumes


def test_presets_that_do_not_fit_the_data_are_skipped_in_a_line(tmp_path, capsys):
    file = study_file(tmp_path, 'dataset = "digits"')
    file.write_text(file.read_text().replace("enqueue = []", 'enqueue = ["model3"]'))
    url = f"sqlite:///{tmp_path / 'p.db'}"
    assert search.main(["--study-file", str(file), "--trials", "1", "--epochs", "1", "--storage", url,
                        "--data-dir", str(tmp_path), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "model3 does not fit 8x8 inputs" in err and "not enqueued" in err


# --- folders -------------------------------------------------------------------------------------


def write_png_folder(root: Path, mnist, train: int, test: int) -> None:
    """MNIST's first images as train/<label>/<index>.png and test/<label>/<index>.png."""
    for part, xs, ys, n in (("train", mnist.train_images, mnist.train_labels, train),
                            ("test", mnist.test_images, mnist.test_labels, test)):
        for i in range(n):
            folder = root / part / str(int(ys[i]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(xs[i].numpy()).save(folder / f"{i:05d}.png")


def test_mnist_as_a_folder_of_pngs_trains_to_the_same_numbers_as_the_built_in_path(tmp_path, mnist):
    write_png_folder(tmp_path / "png", mnist, 1000, 300)
    folder = DataConfig(dataset="folder", path=str(tmp_path / "png"), valid=200, order="last",
                        mean=(MEAN,), std=(STD,))
    from_folder = open_data(folder, tmp_path)
    built_in = cut(Images(mnist.train_images[:1000, None], mnist.train_labels[:1000], mnist.test_images[:300, None],
                          mnist.test_labels[:300], tuple(map(str, range(10)))), DataConfig(valid=200))
    assert from_folder.classes == tuple(map(str, range(10)))
    config = dataclasses.replace(PRESETS["model3"].train, epochs=1, augment=0.5)
    histories = [train(PRESETS["model3"].arch, config, d.split("valid"), RunRecord(), progress=False).history
                 for d in (from_folder, built_in)]
    assert histories[0][0].eval_acc == histories[1][0].eval_acc
    assert histories[0][0].train_loss == histories[1][0].train_loss


def run_error(argv: list[str], capsys) -> list[str]:
    assert search.main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    return err


def test_bad_data_ends_in_one_line(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'e.db'}"
    common = ["--storage", url, "--data-dir", str(tmp_path), "--quiet", "--trials", "1", "--epochs", "1"]
    missing = study_file(tmp_path, f'dataset = "folder"\npath = "{tmp_path / "nowhere"}"', "m")
    err = run_error(["--study-file", str(missing), *common], capsys)
    assert len(err) == 1 and "nowhere" in err[0]
    corrupt = tmp_path / "corrupt"
    for label in ("a", "b"):
        (corrupt / label).mkdir(parents=True)
        for i in range(10):
            Image.new("L", (8, 8), 7 * i).save(corrupt / label / f"0{i}.png")
    (corrupt / "b" / "1.png").write_bytes(b"not a png at all")
    bad = study_file(tmp_path, f'dataset = "folder"\npath = "{corrupt}"', "c")
    err = run_error(["--study-file", str(bad), *common], capsys)
    assert len(err) == 1 and "1.png" in err[0]
    small = study_file(tmp_path, f'dataset = "folder"\npath = "{corrupt}"\nimage_size = 2', "t")
    small.write_text(small.read_text().replace("first_padding = [0, 1]", "first_padding = [0]"))
    (corrupt / "b" / "1.png").unlink()
    err = run_error(["--study-file", str(small), *common], capsys)
    assert len(err) == 1 and "too small" in err[0]
    unknown = study_file(tmp_path, 'dataset = "imagenet"', "u")
    err = run_error(["--study-file", str(unknown), *common], capsys)
    assert len(err) == 1 and "imagenet" in err[0]
    np.savez(tmp_path / "one.npz", x_train=np.zeros((50, 8, 8), np.uint8), y_train=np.full(50, 3))
    one_class = study_file(tmp_path, f'dataset = "npz"\npath = "{tmp_path / "one.npz"}"', "o")
    err = run_error(["--study-file", str(one_class), *common], capsys)
    assert len(err) == 1 and "every training image is labelled '3'" in err[0]
    (tmp_path / "text.npz").write_text("not arrays\n")
    text = study_file(tmp_path, f'dataset = "npz"\npath = "{tmp_path / "text.npz"}"', "x")
    err = run_error(["--study-file", str(text), *common], capsys)
    assert len(err) == 1 and "text.npz: not an npz file" in err[0] and "pickle" not in err[0]
    no_valid = study_file(tmp_path, 'dataset = "digits"\nvalid = 0', "v")
    err = run_error(["--study-file", str(no_valid), *common], capsys)
    assert len(err) == 1 and "valid = 0 holds out no images" in err[0]
    assert not (tmp_path / "e.db").exists() or not optuna.get_all_study_names(url)


def test_train_takes_a_study_files_data(tmp_path, capsys):
    spec = tmp_path / "plain.json"
    spec.write_text(json.dumps({"blocks": [{"widths": [8, 16], "padding": 1}, {"widths": [16]}],
                                "input_size": 8}))
    assert train_command.main(["--model", str(spec), "--study-file", str(DIGITS), "--epochs", "1", "--quiet",
                               "--data-dir", str(tmp_path)]) == 0
    assert "Test accuracy" in capsys.readouterr().out
    assert train_command.main(["--model", "model3", "--study-file", str(DIGITS), "--epochs", "1", "--quiet",
                               "--data-dir", str(tmp_path)]) == 2
    assert "shrinks" in capsys.readouterr().err
