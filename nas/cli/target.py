"""What `--model` names for the commands that train one net (nas.train, nas.deploy): a preset, a
spec file, or a nas.confirm results file (its winner, or --candidate; trained as its run with
--seed was, where it holds one), with its training config, run record and the data it trains on."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from nas import data
from nas.cli.args import positive_int
from nas.cpu import tune_allocator
from nas.data.resize import resized_data, resized_split
from nas.run.record import RunRecord
from nas.spec import PRESETS, ArchSpec, SpecError, TrainConfig, count_params, load_arch
from nas.study.confirm import recorded_run, results_candidate
from nas.studyfile import load_study_config
from nas.train.setup import RunSettings, resolve_run


@dataclass(frozen=True)
class Target:
    name: str  # what the first line calls it
    label: str  # short, for file names: the preset, the spec file's stem, or "<results stem>-<candidate>"
    arch: ArchSpec
    config: TrainConfig
    run: RunRecord
    source: data.Data
    split: data.Split  # all training images (or --subset), evaluated on the test images


def resolve_target(args: argparse.Namespace, settings: RunSettings) -> Target:
    """The net `args.model` names, set up to train on all training images of MNIST or of
    `args.study_file`'s data (resized to the side it is made for). Raises SpecError, ConfirmError, ConfigError, ValueError or DataError
    (all one line) before anything trains; sets the thread count."""
    recorded = recorded_run(Path(args.model), args.seed, args.candidate)
    if recorded is not None:
        label, arch, config, run = recorded
        settings = replace(settings, device=run.device, precision=run.precision, threads=run.threads)
    elif args.candidate:  # a seed the results file has no run of: the candidate, trained afresh
        arch, config = results_candidate(Path(args.model), args.candidate)
    else:
        arch, config = load_arch(args.model)
    device = settings.resolve_device()  # an impossible device or precision fails before the data
    data_config = load_study_config(args.study_file).data if args.study_file else data.DataConfig()
    root = data.resolve_data_dir(args.data_dir)
    source = data.open_data(data_config, root, progress=not args.quiet, notify=lambda line: print(line, file=sys.stderr))
    split = source.split("test", args.subset, device)
    if args.model in PRESETS:
        arch = replace(arch, in_channels=split.shape.channels, input_size=split.shape.size,
                       num_classes=split.shape.classes)
        count_params(arch)  # SpecError where the data's images are too small for it
    elif replace(arch.shape, size=split.shape.size) != split.shape:
        raise SpecError(f"{args.model} is made for {arch.in_channels}x{arch.input_size}x{arch.input_size} inputs "
                        f"and {arch.num_classes} classes; the data is {source.describe()}")
    else:  # made for another side (a study that searched image_sizes): the images are resized to it
        source, split = resized_data(source, arch.input_size), resized_split(split, arch.input_size)
    tune_allocator()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if recorded is not None:
        name = f"{args.model} ({label}, trained as its seed-{args.seed} run was)"
        if args.epochs:
            config = replace(config, epochs=args.epochs)
        run = replace(run, subset=args.subset)
    else:
        name = f"{args.model} ({args.candidate})" if args.candidate else args.model
        config = replace(config or TrainConfig(), seed=args.seed)
        if args.epochs:
            config = replace(config, epochs=args.epochs)
        run = resolve_run(arch, config, settings, device, len(split.train_x), args.subset)
    label = Path(args.model).stem if Path(args.model).suffix else args.model
    if recorded is not None or args.candidate:
        label = f"{label}-{recorded[0] if recorded is not None else args.candidate}"
    return Target(name, label, arch, config, run, source, split)


def add_target_flags(parser: argparse.ArgumentParser, what: str) -> None:
    """--model and the flags that say how it trains first (--epochs, --subset, --seed) and on what."""
    parser.add_argument("--model", default=None if what == "deploy" else "model3",
                        help="model1, model2, model3 or a spec JSON file (a nas.confirm results file trains its "
                        "winner)" + ("; trained first" if what == "deploy" else ""))
    parser.add_argument("--candidate", metavar="LABEL", help="with a results file as --model: train this "
                        "candidate (e.g. model3, trial147) instead of its winner")
    parser.add_argument("--epochs", type=positive_int, help="override the preset's epochs")
    parser.add_argument("--subset", type=positive_int, help="train on the first N training images")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--study-file", type=Path, help="train on this study file's [data] (default MNIST); "
                        "a preset's input and classifier are made to fit it")
