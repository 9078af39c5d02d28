"""A trained net as files a device runs without PyTorch (python -m nas.deploy): BatchNorm folded
into the convolutions, exported to ONNX in fp32 with torch.onnx, quantized to int8 with ONNX
Runtime's static quantization (QDQ, per-channel weights, activations calibrated on training
images), and both files measured with ONNX Runtime: accuracy, latency per image at batch 1, size.
Then the same folded net, with the same calibration images, as a full-integer .tflite (nas.tflite)
and C source for TensorFlow Lite Micro, measured in TFLM's interpreter (nas.tflm): accuracy and the
smallest arena it runs in.

The exported graph takes the images as stored, uint8 (N, C, H, W), and normalizes them itself, so
a caller feeds it raw pixels and needs no mean or std.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from nas.errors import NasError
from nas.model import Residual, BatchNormAct2d

CALIBRATION_IMAGES = 1000  # training images whose activations set the int8 ranges
CALIBRATION_SEED = 0  # which ones: a fixed draw, so a deployment is repeatable
ORT_BATCH = 1000  # images per ONNX Runtime call when measuring accuracy
LATENCY_WARMUP = 20
LATENCY_RUNS = 300
FP32_FILE, INT8_FILE = "model.onnx", "model-int8.onnx"
C_SOURCE, C_HEADER = "model_data.cc", "model_data.h"  # the .tflite as C, for a TFLM project (nas.tflm)


class DeployError(NasError):
    """A model that cannot be exported or quantized as asked."""


def fold_batchnorm(model: nn.Sequential) -> nn.Sequential:
    """The model in evaluation form with every BatchNorm folded into the convolution before it (one
    conv with a bias, then ReLU) and dropout gone: the layers a device runs, and what the flash
    count of nas.spec.costs assumes. A residual's body is folded in place."""
    layers: list[nn.Module] = []
    modules = [Residual(*fold_batchnorm(m.body)) if isinstance(m, Residual) else m for m in model]
    i = 0
    while i < len(modules):
        module = modules[i]
        following = modules[i + 1] if i + 1 < len(modules) else None
        if isinstance(module, nn.Conv2d) and isinstance(following, nn.BatchNorm2d):
            plain = nn.BatchNorm2d(following.num_features, eps=following.eps).eval()
            plain.load_state_dict(following.state_dict())
            layers.append(fuse_conv_bn_eval(module.eval(), plain))
            if isinstance(following, BatchNormAct2d):
                layers.append(nn.ReLU())
            i += 2
            continue
        if not isinstance(module, nn.Dropout | nn.Dropout2d):
            layers.append(module)
        i += 1
    return nn.Sequential(*layers).eval()


class RawImages(nn.Module):
    """uint8 images in, logits out: the net with the data's normalization in front of it."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.net = net
        mean_t, std_t = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
        self.register_buffer("scale", 1 / (255 * std_t))
        self.register_buffer("shift", -mean_t / std_t)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.float() * self.scale + self.shift)


def deployable(model: nn.Sequential, mean: tuple[float, ...], std: tuple[float, ...]) -> RawImages:
    """The trained model, BatchNorm folded, on CPU in fp32, taking uint8 images (a copy: the model
    given is left as it was, on its device, in its memory format and mode)."""
    model = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).float().eval()
    return RawImages(fold_batchnorm(model), mean, std).eval()


def export_onnx(module: RawImages, shape: tuple[int, int, int], path: Path) -> None:
    """fp32 ONNX with a dynamic batch axis. torch.onnx's node metadata (the exporting machine's
    stack traces and paths, most of a tiny net's file) is dropped."""
    import onnx

    example = torch.zeros((1, *shape), dtype=torch.uint8)
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(module, (example,), str(path), dynamo=True, input_names=["image"],
                          output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                          verbose=False, external_data=False)
    model = onnx.load(str(path))
    strip(model)
    onnx.save(model, str(path))


def strip(model) -> None:
    """Drop what a device has no use for: node metadata and doc strings, intermediate shapes."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.graph.value_info[:]


def session(path: Path, threads: int | None = None):
    """An ONNX Runtime CPU session, quiet (warnings only where it fails)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def logits(path: Path, images: np.ndarray, threads: int | None = None) -> np.ndarray:
    runner = session(path, threads)
    return np.concatenate([runner.run(None, {"image": images[i:i + ORT_BATCH]})[0]
                           for i in range(0, len(images), ORT_BATCH)])


def accuracy(path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    """Percent of `images` (uint8, N C H W) the ONNX model at `path` classifies as `labels`."""
    return 100.0 * float((logits(path, images).argmax(1) == labels).mean())


def calibration_images(train_x: torch.Tensor, count: int = CALIBRATION_IMAGES) -> np.ndarray:
    """A fixed draw of `count` training images (all of them where there are fewer)."""
    generator = torch.Generator().manual_seed(CALIBRATION_SEED)
    order = torch.randperm(len(train_x), generator=generator)[:count]
    return train_x.cpu()[order.sort().values].numpy()


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: np.ndarray) -> None:
    """ONNX Runtime static quantization: QDQ, int8 weights per output channel and int8 activations,
    their ranges the min and max seen on `calibration` (ONNX Runtime's default, MinMax)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[dict] = iter([{"image": calibration[i:i + 100]}
                                                 for i in range(0, len(calibration), 100)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp, quiet_quantizer():
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_static(str(prepared), str(int8_path), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        extra_options={"CalibTensorRangeSymmetric": False})
    import onnx

    model = onnx.load(str(int8_path))
    strip(model)
    del model.metadata_props[:]
    onnx.save(model, str(int8_path))


@contextlib.contextmanager
def quiet_quantizer():
    """ONNX Runtime's quantizer logs advice at INFO and WARNING through the root logger; keep them
    out of the user's terminal."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def latency_ms(path: Path, shape: tuple[int, int, int], threads: int = 1) -> float:
    """Median milliseconds of one ONNX Runtime call on one image, single-threaded (as on a small
    device), after a warm-up."""
    runner = session(path, threads)
    image = {"image": np.zeros((1, *shape), dtype=np.uint8)}
    for _ in range(LATENCY_WARMUP):
        runner.run(None, image)
    times = []
    for _ in range(LATENCY_RUNS):
        start = time.perf_counter()
        runner.run(None, image)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


@dataclass(frozen=True)
class Measured:
    """What deploy measured of one model."""

    max_abs_difference: float  # ONNX Runtime fp32 against PyTorch, logits, on a batch of test images
    fp32_accuracy: float  # ONNX Runtime, percent of the evaluation images
    int8_accuracy: float
    fp32_bytes: int
    int8_bytes: int
    fp32_latency_ms: float | None
    int8_latency_ms: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def export_and_measure(module: RawImages, shape: tuple[int, int, int], *, calibration: np.ndarray,
                       eval_x: np.ndarray, eval_y: np.ndarray, out: Path, latency: bool = True) -> Measured:
    """Write FP32_FILE and INT8_FILE into `out` and measure both on the evaluation images."""
    fp32, int8 = out / FP32_FILE, out / INT8_FILE
    # An exporter's or quantizer's failure on a net nas built is a bug, here or in the library, and
    # rises with its traceback; only a file the user's --out can't take is theirs to fix.
    try:
        export_onnx(module, shape, fp32)
        check = eval_x[:256]
        with torch.inference_mode():
            expected = module(torch.from_numpy(check)).numpy()
        difference = float(np.abs(logits(fp32, check) - expected).max())
        quantize_int8(fp32, int8, calibration)
    except OSError as exc:
        raise DeployError(f"cannot write the models into {out}: {exc.strerror or exc}") from exc
    return Measured(difference, accuracy(fp32, eval_x, eval_y), accuracy(int8, eval_x, eval_y),
                    os.path.getsize(fp32), os.path.getsize(int8),
                    latency_ms(fp32, shape) if latency else None, latency_ms(int8, shape) if latency else None)


@dataclass(frozen=True)
class TFLiteMeasured:
    """What deploy measured of the int8 .tflite (nas.tflite) in TensorFlow Lite Micro (nas.tflm)."""

    tflite_bytes: int
    weight_bytes: int  # its int8 weights and int32 biases
    ops: tuple[str, ...]  # the TFLM ops it uses, in order of first use
    arena_bytes: int  # the smallest arena TFLM's 64-bit interpreter runs it in (bisection)
    device_arena_bytes: int  # a 32-bit build's, by our count of its smaller structs (nas.tflm.device_arena)
    head_bytes: int  # of the arena: the planned activations
    accuracy: float  # TFLM, percent of the evaluation images
    seconds: float  # converting and writing the .tflite
    litert_accuracy: float | None = None  # the same file in LiteRT's interpreter (its default, XNNPACK), where
    litert_same_class: int | None = None  # ai-edge-litert is installed; images it gives TFLM's class
    litert_reference_identical: int | None = None  # images LiteRT's reference kernels give TFLM's int8 outputs

    def to_dict(self) -> dict:
        return asdict(self)


def write_tflite(module: RawImages, mean: tuple[float, ...], std: tuple[float, ...], calibration: np.ndarray,
                 out: Path) -> tuple[bytes, list[str]]:
    """TFLITE_FILE (nas.tflite) of the deployable net into `out`; its bytes and ops."""
    from nas import tflite

    graph, model = tflite.convert(module.net, mean, std, calibration)
    (out / tflite.TFLITE_FILE).write_bytes(model)
    return model, graph.op_codes


def measure_tflite(module: RawImages, mean: tuple[float, ...], std: tuple[float, ...], *, calibration: np.ndarray,
                   eval_x: np.ndarray, eval_y: np.ndarray, out: Path, arena: int | None = None) -> TFLiteMeasured:
    """Writes the .tflite, then model_data.cc/.h with the smallest arena TFLM runs it in, and
    measures its accuracy in TFLM (in `arena` bytes where given: ArenaTooSmall if it needs more)
    and, where installed, in LiteRT. TFLMError where tflite-micro is missing; TFLiteError for a
    layer without an int8 op."""
    from nas import tflm

    tflm.runtime()  # before any work: says how to install it
    start = time.perf_counter()
    try:
        model, ops = write_tflite(module, mean, std, calibration, out)
        seconds = time.perf_counter() - start
        smallest = tflm.smallest_arena(model)
        found = tflm.allocations(model, smallest)
        device = tflm.device_arena(found, smallest)
        cc, h = tflm.c_source(model, arena=smallest, device=device, ops=ops)
        (out / C_SOURCE).write_text(cc)
        (out / C_HEADER).write_text(h)
    except OSError as exc:
        raise DeployError(f"cannot write the TFLite files into {out}: {exc.strerror or exc}") from exc
    if arena is not None and arena < smallest:
        raise tflm.ArenaTooSmall(f"the model needs a {smallest:,}-byte TFLM arena, more than --arena {arena:,} "
                                 f"(files written into {out})")
    outputs = tflm.logits(model, eval_x, arena or smallest)
    accuracy = 100.0 * float((outputs.argmax(1) == eval_y).mean())
    measured = TFLiteMeasured(len(model), _weight_bytes(model), tuple(ops), smallest, device, found.head, accuracy,
                              seconds)
    litert, reference = litert_logits(model, eval_x), litert_logits(model, eval_x, reference=True)
    if litert is None:
        return measured
    return replace(measured, litert_accuracy=100.0 * float((litert.argmax(1) == eval_y).mean()),
                   litert_same_class=int((litert.argmax(1) == outputs.argmax(1)).sum()),
                   litert_reference_identical=int((reference == outputs).all(axis=1).sum()))


def _weight_bytes(model: bytes) -> int:
    """The bytes of a .tflite's constant buffers (its weights and biases), read back from the file."""
    import tflite

    read = tflite.Model.GetRootAs(model, 0)
    return sum(read.Buffers(i).DataLength() for i in range(read.BuffersLength()))


def litert_logits(model: bytes, images: np.ndarray, reference: bool = False) -> np.ndarray | None:
    """The .tflite's outputs in LiteRT's interpreter (ai-edge-litert: its default kernels, XNNPACK's
    on this CPU, or with `reference` its reference kernels), or None where it is not installed."""
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError:
        return None
    from nas.tflm import captured

    kernels = OpResolverType.BUILTIN_REF if reference else OpResolverType.AUTO
    with captured():  # its "INFO: Created TensorFlow Lite XNNPACK delegate" line
        runner = Interpreter(model_content=model, experimental_op_resolver_type=kernels)
        runner.allocate_tensors()
    source, target = runner.get_input_details()[0]["index"], runner.get_output_details()[0]["index"]
    rows = []
    for image in images:
        runner.set_tensor(source, np.ascontiguousarray(image.transpose(1, 2, 0)[None]))
        runner.invoke()
        rows.append(runner.get_tensor(target).reshape(-1).copy())
    return np.stack(rows)


def tflm_accuracy(model: nn.Sequential, mean: tuple[float, ...], std: tuple[float, ...], train_x: torch.Tensor,
                  eval_x: torch.Tensor, eval_y: torch.Tensor) -> float | None:
    """TFLM's accuracy of the int8 .tflite nas.deploy would write of a trained model, on the
    evaluation images (None where tflite-micro is not installed): what `nas.confirm --int8` stores."""
    from nas import tflite, tflm

    if not tflm.available():
        return None
    _, binary = tflite.convert(deployable(model, mean, std).net, mean, std, calibration_images(train_x))
    return tflm.accuracy(binary, eval_x.cpu().numpy(), eval_y.cpu().numpy(), tflm.smallest_arena(binary))


def int8_accuracy(model: nn.Sequential, mean: tuple[float, ...], std: tuple[float, ...], train_x: torch.Tensor,
                  eval_x: torch.Tensor, eval_y: torch.Tensor) -> tuple[float, float]:
    """(fp32, int8) ONNX Runtime accuracy of a trained model on the evaluation images, through a
    temporary export: what `nas.confirm --int8` and a study scored on int8 measure per run."""
    module = deployable(model, mean, std)
    shape = tuple(eval_x.shape[1:])
    with tempfile.TemporaryDirectory() as tmp:
        measured = export_and_measure(module, shape, calibration=calibration_images(train_x),
                                      eval_x=eval_x.cpu().numpy(), eval_y=eval_y.cpu().numpy(), out=Path(tmp),
                                      latency=False)
    return measured.fp32_accuracy, measured.int8_accuracy
