"""A .tflite run in TensorFlow Lite Micro's own interpreter (the `tflite-micro` package: TFLM's
kernels and memory planner, built for this 64-bit machine): its accuracy on images, the smallest
arena it runs in, and the C source that carries it into a microcontroller project.

The arena here and on a 32-bit Cortex-M: the activations (the planned head) are the same bytes;
the tail holds structs with pointers (a TfLiteEvalTensor per tensor, a node and registration per
op, the allocator's own objects; the Python interpreter's allocator also records what it allocates),
all smaller on a 32-bit build. So the arena found here is a bound on what a device needs, with TFLM's
reference kernels; CMSIS-NN's convs also ask for scratch buffers (docs/devices.md).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from nas.errors import NasError

INSTALL_HINT = 'pip install "tflite-micro" "tflite"'
ARENA_LIMIT = 64 << 20  # bisection gives up above this: no net nas builds comes near it
# Each TFLM op a .tflite of nas.tflite may hold, and the MicroMutableOpResolver call registering it.
RESOLVER_CALLS = {"QUANTIZE": "AddQuantize", "CONV_2D": "AddConv2D", "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D",
                  "MAX_POOL_2D": "AddMaxPool2D", "AVERAGE_POOL_2D": "AddAveragePool2D", "ADD": "AddAdd",
                  "PAD": "AddPad", "FULLY_CONNECTED": "AddFullyConnected"}
# 64-bit sizes of the tail's structs with pointers, and their 32-bit (Cortex-M) sizes
# (tensorflow/lite/c/common.h built with TF_LITE_STATIC_MEMORY, micro_allocator.h).
EVAL_TENSOR_BYTES = {64: 24, 32: 12}  # TfLiteEvalTensor: data and dims pointers, type
NODE_BYTES = {64: 64, 32: 32}  # NodeAndRegistration: TfLiteNode (6 pointers, an int) and a pointer


class TFLMError(NasError):
    """TensorFlow Lite Micro is missing, or cannot run a model as asked."""


class ArenaTooSmall(TFLMError):
    """The model needs a larger arena than given."""


class TFLMMissing(TFLMError):
    """tflite-micro (or the writer's tflite and flatbuffers) is not installed."""


def runtime():
    """tflite_micro.runtime, or TFLMMissing saying how to install it (and what nas.tflite writes with)."""
    try:
        import flatbuffers  # noqa: F401  (nas.tflite writes with them)
        import tflite  # noqa: F401
        from tflite_micro import runtime as tflm_runtime
    except ImportError as exc:
        raise TFLMMissing(f"TensorFlow Lite Micro is not installed ({exc.name} missing): {INSTALL_HINT}") from None
    return tflm_runtime


def available() -> bool:
    try:
        runtime()
    except TFLMMissing:
        return False
    return True


@contextlib.contextmanager
def captured() -> Iterator[list[str]]:
    """What TFLM prints (its C code writes to file descriptors 1 and 2), kept from the terminal;
    the list holds the text once the block ends."""
    text: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stdout(open(os.devnull, "w")) as devnull, devnull:
                yield text
        finally:
            sys.stdout.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sink.seek(0)
            text.append(sink.read().decode(errors="replace"))


def interpreter(model: bytes, arena: int):
    """TFLM's interpreter of `model` with its tensors allocated in an `arena`-byte arena.
    ArenaTooSmall where they do not fit; TFLMError (its own words) where TFLM refuses the model."""
    tflm = runtime()
    with captured() as printed:
        try:
            return tflm.Interpreter.from_bytes(model, arena_size=arena)
        except RuntimeError:
            pass
    said = " ".join(printed).strip()
    missing = re.search(r"Didn't find op for builtin opcode '(\w+)'", said)
    if missing:
        raise TFLMError(f"TensorFlow Lite Micro has no kernel for the op {missing.group(1)}")
    if re.search(r"Requested|bytes required|Too many buffers", said):
        raise ArenaTooSmall(f"the model does not run in a {arena:,}-byte TFLM arena")
    raise TFLMError(f"TensorFlow Lite Micro cannot load the model: {said.splitlines()[-1] if said else 'no reason given'}")


def fits(model: bytes, arena: int) -> bool:
    try:
        interpreter(model, arena)
    except ArenaTooSmall:
        return False
    return True


def smallest_arena(model: bytes, start: int = 16384) -> int:
    """The fewest arena bytes TFLM allocates `model`'s tensors in: doubling from `start` until it
    fits, then bisection to the byte."""
    high = start
    while not fits(model, high):
        if high > ARENA_LIMIT:
            raise TFLMError(f"the model does not fit in a {ARENA_LIMIT:,}-byte arena")
        high *= 2
    low = 0
    while high - low > 1:
        middle = (low + high) // 2
        if fits(model, middle):
            high = middle
        else:
            low = middle
    return high


@dataclass(frozen=True)
class Allocations:
    """What TFLM's recording allocator says it put in the arena (64-bit)."""

    total: int
    head: int  # the planned activations (and scratch buffers): the same bytes on any build
    tail: int  # persistent structs and op data
    eval_tensors: int  # how many TfLiteEvalTensor structs
    nodes: int  # how many NodeAndRegistration structs


def allocations(model: bytes, arena: int) -> Allocations:
    """Parses print_allocations() of an interpreter of `model` in an `arena`-byte arena."""
    runner = interpreter(model, arena)
    with captured() as printed:
        runner.print_allocations()
    text = printed[0]

    def number(pattern: str) -> int:
        found = re.search(pattern, text)
        if not found:
            raise TFLMError(f"unexpected print_allocations output: no {pattern!r}")
        return int(found.group(1))

    return Allocations(number(r"allocation total (\d+)"), number(r"allocation head (\d+)"),
                       number(r"allocation tail (\d+)"), number(r"'TfLiteEvalTensor data'.*?for (\d+) allocations"),
                       number(r"for (\d+) NodeAndRegistration structs"))


def device_arena(found: Allocations, arena: int) -> int:
    """An estimate of the arena a 32-bit build needs for what needs `arena` bytes here: the
    TfLiteEvalTensor and node structs at their 32-bit sizes (the allocator's own objects and the
    ops' data shrink too, so it is still a bound from above on them)."""
    saved = found.eval_tensors * (EVAL_TENSOR_BYTES[64] - EVAL_TENSOR_BYTES[32]) \
        + found.nodes * (NODE_BYTES[64] - NODE_BYTES[32])
    return arena - saved


def logits(model: bytes, images: np.ndarray, arena: int) -> np.ndarray:
    """The int8 outputs of `model` for `images` (uint8, N C H W), one image an invoke."""
    runner = interpreter(model, arena)
    details = runner.get_input_details(0)
    rows = []
    for image in images:
        runner.set_input(np.ascontiguousarray(image.transpose(1, 2, 0)[None]).astype(details["dtype"]), 0)
        runner.invoke()
        rows.append(runner.get_output(0).reshape(-1).copy())
    return np.stack(rows)


def accuracy(model: bytes, images: np.ndarray, labels: np.ndarray, arena: int) -> float:
    """Percent of `images` TFLM classifies as `labels` (argmax of the int8 outputs, first on ties)."""
    return 100.0 * float((logits(model, images, arena).argmax(1) == labels).mean())


def tensors(model: bytes, image: np.ndarray, count: int, arena: int = 1 << 20) -> list[np.ndarray]:
    """Every tensor's values after one invoke on `image` (uint8, C H W), from an interpreter that
    keeps them all (a linear plan, no reuse): to hold each op's output to a reference."""
    tflm = runtime()
    with captured():
        runner = tflm.Interpreter.from_bytes(model, arena_size=arena,
                                             intrepreter_config=tflm.InterpreterConfig.kPreserveAllTensors)
    runner.set_input(np.ascontiguousarray(image.transpose(1, 2, 0)[None]), 0)
    runner.invoke()
    return [runner.GetTensor(i, 0)["tensor_data"] for i in range(count)]


# --- C source for a TFLM project --------------------------------------------------------------------

def c_source(model: bytes, *, name: str = "g_model", arena: int, device: int, ops: list[str],
             header: str = "model_data.h") -> tuple[str, str]:
    """(model_data.cc, model_data.h): the bytes as a 16-byte aligned const array with its length,
    the arena size and the ops a MicroMutableOpResolver must register."""
    calls = "".join(f"\n//   resolver.{RESOLVER_CALLS[op]}();" for op in ops)
    guard = "NAS_MODEL_DATA_H_"
    h = f"""// Written by nas.deploy: an int8 TFLite model for TensorFlow Lite Micro.
#ifndef {guard}
#define {guard}

#include <cstddef>

// The model's bytes ({len(model):,}), 16-byte aligned.
extern const unsigned char {name}[];
extern const unsigned int {name}_len;

// Arena bytes: the fewest this model's tensors were allocated in by TFLM's 64-bit Python
// interpreter (reference kernels, its recording allocator). A 32-bit build's structs are smaller:
// {device:,} B by our count of them (nas/tflm.py); give the 64-bit figure where in doubt.
// CMSIS-NN's kernels ask for scratch buffers on top.
constexpr size_t k{name[2:].title().replace('_', '')}ArenaSize = {arena};

// The ops to register ({len(ops)}):
//   tflite::MicroMutableOpResolver<{len(ops)}> resolver;{calls}

#endif  // {guard}
"""
    rows = [", ".join(f"0x{b:02x}" for b in model[i:i + 12]) for i in range(0, len(model), 12)]
    body = ",\n  ".join(rows)
    cc = f"""// Written by nas.deploy from model-int8.tflite.
#include "{header}"

alignas(16) const unsigned char {name}[] = {{
  {body}
}};
const unsigned int {name}_len = {len(model)};
"""
    return cc, h


def bytes_of_c_array(source: str) -> bytes:
    """The bytes of the first brace-enclosed hex array in C `source` (to check a model_data.cc)."""
    body = source[source.index("{") + 1:source.index("}")]
    return bytes(int(word, 16) for word in re.findall(r"0x[0-9a-fA-F]{2}", body))
