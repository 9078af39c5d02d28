"""A model to ship: BatchNorm folded, exported to fp32 ONNX and quantized to int8 with ONNX Runtime,
both measured on the test images (accuracy, size, latency per image at batch 1 on this CPU).

    python -m nas.deploy                          # the best trial of studies/mnist-8k.db, its stored weights
    python -m nas.deploy --trial 7 --full-train   # trial 7 retrained on all training images first
    python -m nas.deploy --model model3 --epochs 15 --out model3/

Writes model.onnx, model-int8.onnx, model-int8.tflite, model_data.cc/.h (the .tflite as C for a
TensorFlow Lite Micro project, with the arena it needs) and report.json into --out. Every file takes
uint8 images and normalizes them itself. How: nas/deployment.py, nas/tflite.py, nas/tflm.py.
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
from nas.cli.args import ArgumentParser, add_data_dir, add_run_flags, fail, positive_int, run_settings
from nas.cli.target import add_target_flags, resolve_target
from nas.cpu import cpu_model, tune_allocator
from nas.data.resize import resized_data
from nas.deployment import (C_HEADER, C_SOURCE, CALIBRATION_IMAGES, FP32_FILE, INT8_FILE, DeployError, RawImages,
                            TFLiteMeasured, calibration_images, deployable, export_and_measure, measure_tflite)
from nas.errors import NasError
from nas.costmodel import CURRENT, costs
from nas.spec import ArchSpec, count_params, layer_string
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
    parser.add_argument("--arena", type=positive_int, metavar="N", help="the device's TFLM arena in bytes: fail "
                        "(after writing the files) if the model needs more, else measure it in N bytes")
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
    try:
        report, problem = deploy(trained, out, arena=args.arena)
    except NasError as exc:  # --out's files could not be written
        return fail(exc, status=1)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print("\n".join(summary_lines(report, out)))
    if problem is not None:
        return fail(problem, status=1)
    return 0


def tflite_part(module: RawImages, source: data.Data, out: Path,
                arena: int | None) -> tuple[TFLiteMeasured | None, NasError | None]:
    """The .tflite and its C source, measured in TFLM; or None and the one line that says why not
    (tflite-micro missing, a layer without an int8 op, a larger arena than --arena)."""
    from nas.tflite import TFLiteError
    from nas.tflm import ArenaTooSmall, TFLMError

    try:
        return measure_tflite(module, source.mean, source.std, calibration=calibration_images(source.train_x),
                              eval_x=source.test_x.numpy(), eval_y=source.test_y.numpy(), out=out, arena=arena), None
    except (TFLiteError, ArenaTooSmall, TFLMError) as exc:
        return None, exc


def deploy(trained: Trained, out: Path, arena: int | None = None) -> tuple[dict, NasError | None]:
    """Export, quantize and measure `trained` into `out`; the report as a dict, and what kept the
    TFLite part from finishing (None: nothing)."""
    source = trained.source
    mean, std = source.mean, source.std
    test_x, test_y = source.test_x, source.test_y
    model = trained.model.to("cpu")
    _, correct = evaluate(RawImages(model, mean, std), test_x, test_y)  # PyTorch's own accuracy, as trained
    shape = tuple(test_x.shape[1:])
    measured = export_and_measure(deployable(model, mean, std), shape, calibration=calibration_images(source.train_x),
                                  eval_x=test_x.numpy(), eval_y=test_y.numpy(), out=out)
    tfl, problem = tflite_part(deployable(model, mean, std), source, out, arena)
    cost, before = costs(trained.arch), costs(trained.arch, "mcunet")
    import onnxruntime

    report = {
        "format": REPORT_FORMAT, "model": trained.label, "trained": trained.how,
        "arch": trained.arch.to_dict(), "layers": layer_string(trained.arch), "params": count_params(trained.arch),
        "macs": cost.macs, "peak_ram": cost.peak_ram, "flash": cost.flash, "cost_model": CURRENT,
        "mcunet": {"peak_ram": before.peak_ram, "flash": before.flash},
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
        "tflm_accuracy": tfl.accuracy if tfl else None,
        "tflm_arena_bytes": tfl.arena_bytes if tfl else None,
        "tflite_bytes": tfl.tflite_bytes if tfl else None,
        "tflite": tfl.to_dict() if tfl else {"not_written": str(problem)},
    }
    if tfl:
        report["files"].update({"model-int8.tflite": tfl.tflite_bytes, C_SOURCE: (out / C_SOURCE).stat().st_size,
                                C_HEADER: (out / C_HEADER).stat().st_size})
        report["tflite"]["tflm"] = tflm_version()
    from nas.tflm import TFLMMissing

    # tflite-micro missing is a note (the ONNX files are a deployment); anything else fails the command
    return report, None if isinstance(problem, TFLMMissing) else problem


def tflm_version() -> str:
    from importlib.metadata import version

    return version("tflite-micro")


def summary_lines(report: dict, out: Path) -> list[str]:
    acc, files, latency = report["accuracy"], report["files"], report["latency_ms_per_image"]
    return [
        f"{report['model']}: {report['params']:,} params, {report['macs']:,} MACs, TFLM arena at most "
        f"{report['peak_ram']:,} B, .tflite at most {report['flash']:,} B (cost model {report['cost_model']!r}); "
        f"{report['trained']}",
        f"ONNX Runtime fp32 matches PyTorch: max abs difference {report['max_abs_difference']:.2e} on 256 images "
        f"(PyTorch {acc['pytorch']:.2f}%)",
        f"test accuracy on {report['test_images']:,} images: fp32 {acc['fp32']:.2f}%, int8 {acc['int8']:.2f}% "
        f"({acc['int8'] - acc['fp32']:+.2f} points); {FP32_FILE} {files[FP32_FILE]:,} B, {INT8_FILE} "
        f"{files[INT8_FILE]:,} B; {latency['fp32']:.3f} ms fp32, {latency['int8']:.3f} ms int8 per image "
        f"(batch 1, 1 thread, {report['cpu']})",
    ] + tflite_lines(report, out) + [
        f"wrote {out / FP32_FILE}, {out / INT8_FILE}"
        + (f", {out / 'model-int8.tflite'}, {out / C_SOURCE}, {out / C_HEADER}" if report["tflite_bytes"] else "")
        + f" and {out / 'report.json'}",
    ]


def tflite_lines(report: dict, out: Path) -> list[str]:
    tfl = report["tflite"]
    if report["tflite_bytes"] is None:
        return [f"model-int8.tflite not written: {tfl['not_written']}"]
    lines = [
        f"TFLite int8: model-int8.tflite {tfl['tflite_bytes']:,} B ({tfl['weight_bytes']:,} B of weights and "
        f"biases); TFLM {tfl['accuracy']:.2f}% on {report['test_images']:,} test images (ONNX Runtime int8 "
        f"{report['accuracy']['int8']:.2f}%)",
        f"TFLM arena: {tfl['arena_bytes']:,} B at the least on this 64-bit build ({tfl['head_bytes']:,} B of "
        f"activations), a bound for a 32-bit device, which needs about {tfl['device_arena_bytes']:,} B; ops: "
        f"{', '.join(tfl['ops'])}",
    ]
    if tfl["litert_accuracy"] is not None:
        images = report["test_images"]
        lines.append(f"LiteRT runs the same file at {tfl['litert_accuracy']:.2f}% (TFLM's class on "
                     f"{tfl['litert_same_class']:,} of {images:,} images); its reference kernels give TFLM's int8 "
                     f"outputs on {tfl['litert_reference_identical']:,} of {images:,}")
    return lines
