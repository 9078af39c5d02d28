"""A model to ship: BatchNorm folded, exported to fp32 ONNX and quantized to int8 with ONNX Runtime,
both measured on the test images (accuracy, size, latency per image at batch 1 on this CPU).

    python -m nas.deploy                          # the best trial of studies/mnist-8k.db, its stored weights
    python -m nas.deploy --trial 7 --full-train   # trial 7 retrained on all training images first
    python -m nas.deploy --model model3 --epochs 15 --out model3/

Writes model.onnx, model-int8.onnx and report.json into --out. The graphs take uint8 images
(N, C, H, W) and normalize them themselves. How: nas/deployment.py.
"""

from __future__ import annotations

import datetime
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from torch import nn

from nas import data
from nas.cli.args import ArgumentParser, add_data_dir, add_run_flags, fail, run_settings
from nas.cli.target import add_target_flags, resolve_target
from nas.cpu import cpu_model, tune_allocator
from nas.data.resize import resized_data
from nas.deployment import (CALIBRATION_IMAGES, FP32_FILE, INT8_FILE, DeployError, RawImages, calibration_images,
                            deployable, export_and_measure)
from nas.errors import NasError
from nas.spec import ArchSpec, costs, count_params, layer_string
from nas.storage import artifact_dir_for, default_url
from nas.study.stored import (DEFAULT_STUDY, config_from_study, open_study, open_study_data, pick_trial, replay_setup,
                              stored_weights)
from nas.train import DivergedError, epoch_line, evaluate, train

REPORT_FORMAT = "nas-deploy-report"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m nas.deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trial", type=int, help="deploy this trial of --study (default: the study's best, as "
                        "nas.replay picks it), from the weights it stored")
    parser.add_argument("--study", default=DEFAULT_STUDY, help=f"study name (default {DEFAULT_STUDY})")
    parser.add_argument("--storage", help="storage URL (default sqlite:///studies/<study>.db)")
    parser.add_argument("--artifact-dir", help="where the study's trial weights are (default: as nas.search)")
    parser.add_argument("--full-train", action="store_true",
                        help="retrain the trial on all training images with its stored seed, and deploy that")
    add_target_flags(parser, "deploy")
    parser.add_argument("--out", type=Path, help="directory for the two models and report.json "
                        "(default runs/deploy-<study>-trial<N> or runs/deploy-<model>)")
    add_data_dir(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_run_flags(parser)
    return parser


@dataclass
class Trained:
    """A trained net to deploy, and where it came from."""

    label: str  # for the report and the default directory
    arch: ArchSpec
    model: nn.Module
    source: data.Data  # its data: calibration from the training images, accuracy on the test images
    how: str  # one line: how it was trained


def from_study(args) -> Trained:
    storage_url = args.storage or default_url(args.study)
    study = open_study(storage_url, args.study)
    trial = pick_trial(study, args.trial)
    root = data.resolve_data_dir(args.data_dir)
    source = open_study_data(study, root, not args.quiet, notify=lambda line: print(line, file=sys.stderr))
    label = f"{study.study_name}-trial{trial.number}"
    if args.full_train:
        arch, config, run = replay_setup(trial, config_from_study(study), None, args.device if args.device != "auto"
                                         else None, None, full_train=True)
        tune_allocator()
        if run.threads:
            torch.set_num_threads(run.threads)
        source = resized_data(source, arch.input_size)  # the input side the trial drew, where it drew one
        split = source.split("test", None, torch.device(run.device))
        print(f"Training trial {trial.number} on all {len(split.train_x):,} training images: {config.epochs} "
              f"epochs, seed {config.seed}, {run.describe()}", flush=True)
        model = train_and_report(arch, config, split, run, args.quiet)
        return Trained(label + "-full", arch, model, source,
                       f"retrained on all {len(split.train_x):,} training images, seed {config.seed}")
    directory = Path(args.artifact_dir) if args.artifact_dir else artifact_dir_for(storage_url)
    model, saved = stored_weights(trial, directory)
    arch = ArchSpec.from_dict(saved["arch"])
    images = saved["run"].get("subset") or len(source.train_x)
    return Trained(label, arch, model, resized_data(source, arch.input_size), f"the weights trial {trial.number} stored (trained on {images:,} "
                   "training images, validation held out)")


def from_model(args) -> Trained:
    target = resolve_target(args, run_settings(args))
    print(f"Training {target.name}: {count_params(target.arch):,} params, {target.config.epochs} epochs, seed "
          f"{target.config.seed}, {target.run.describe()}", flush=True)
    model = train_and_report(target.arch, target.config, target.split, target.run, args.quiet)
    return Trained(target.label, target.arch, model, target.source,
                   f"trained {target.config.epochs} epochs on {len(target.split.train_x):,} training images, "
                   f"seed {target.config.seed}")


def train_and_report(arch, config, split, run, quiet: bool) -> nn.Module:
    result = train(arch, config, split, run, progress=not quiet,
                   on_epoch=lambda r, m: print(f"Epoch {r.epoch}: {epoch_line(r, split.eval_name)}", flush=True))
    return result.model


def out_dir(args, label: str) -> Path:
    out = args.out or Path("runs") / f"deploy-{label}"
    if out.exists() and not out.is_dir():
        raise DeployError(f"--out {out} is a file, not a directory")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.model and (args.trial is not None or args.full_train):
        return fail(DeployError("--model deploys a preset, spec or results file; --trial and --full-train a "
                                "study's trial: give one of them"))
    if args.out and args.out.exists() and not args.out.is_dir():  # before anything trains
        return fail(DeployError(f"--out {args.out} is a file, not a directory"))
    try:
        trained = from_model(args) if args.model else from_study(args)
        out = out_dir(args, trained.label)
        out.mkdir(parents=True, exist_ok=True)
    except DivergedError as exc:  # the training's result, not a mistake in the command
        return fail(exc, status=1)
    except NasError as exc:
        return fail(exc)
    report = deploy(trained, out)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print("\n".join(summary_lines(report, out)))
    return 0


def deploy(trained: Trained, out: Path) -> dict:
    """Export, quantize and measure `trained` into `out`; the report as a dict."""
    source = trained.source
    mean, std = source.mean, source.std
    test_x, test_y = source.test_x, source.test_y
    model = trained.model.to("cpu")
    _, correct = evaluate(RawImages(model, mean, std), test_x, test_y)  # PyTorch's own accuracy, as trained
    shape = tuple(test_x.shape[1:])
    measured = export_and_measure(deployable(model, mean, std), shape, calibration=calibration_images(source.train_x),
                                  eval_x=test_x.numpy(), eval_y=test_y.numpy(), out=out)
    cost = costs(trained.arch)
    import onnxruntime

    return {
        "format": REPORT_FORMAT, "model": trained.label, "trained": trained.how,
        "arch": trained.arch.to_dict(), "layers": layer_string(trained.arch), "params": count_params(trained.arch),
        "macs": cost.macs, "peak_ram": cost.peak_ram, "flash": cost.flash,
        "files": {FP32_FILE: measured.fp32_bytes, INT8_FILE: measured.int8_bytes},
        "input": {"dtype": "uint8", "shape": ["N", *shape], "mean": list(mean), "std": list(std),
                  "note": "pixels as stored (0-255); the graph normalizes them"},
        "test_images": len(test_y),
        "accuracy": {"pytorch": 100.0 * correct / len(test_y), "fp32": measured.fp32_accuracy,
                     "int8": measured.int8_accuracy},
        "max_abs_difference": measured.max_abs_difference,
        "latency_ms_per_image": {"fp32": measured.fp32_latency_ms, "int8": measured.int8_latency_ms,
                                 "batch": 1, "threads": 1},
        "calibration": {"images": min(CALIBRATION_IMAGES, len(source.train_x)), "from": "training images",
                        "method": "MinMax, per-channel int8 weights, int8 activations (QDQ)"},
        "cpu": cpu_model(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "date": datetime.date.today().isoformat(),
    }


def summary_lines(report: dict, out: Path) -> list[str]:
    acc, files, latency = report["accuracy"], report["files"], report["latency_ms_per_image"]
    return [
        f"{report['model']}: {report['params']:,} params, {report['macs']:,} MACs, peak RAM {report['peak_ram']:,} B, "
        f"flash {report['flash']:,} B (int8); {report['trained']}",
        f"ONNX Runtime fp32 matches PyTorch: max abs difference {report['max_abs_difference']:.2e} on 256 images "
        f"(PyTorch {acc['pytorch']:.2f}%)",
        f"test accuracy on {report['test_images']:,} images: fp32 {acc['fp32']:.2f}%, int8 {acc['int8']:.2f}% "
        f"({acc['int8'] - acc['fp32']:+.2f} points); {FP32_FILE} {files[FP32_FILE]:,} B, {INT8_FILE} "
        f"{files[INT8_FILE]:,} B; {latency['fp32']:.3f} ms fp32, {latency['int8']:.3f} ms int8 per image "
        f"(batch 1, 1 thread, {report['cpu']})",
        f"wrote {out / FP32_FILE}, {out / INT8_FILE} and {out / 'report.json'}",
    ]
