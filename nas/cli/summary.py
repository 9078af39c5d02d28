"""Layer table of an architecture in the seed study's style, measured on the built model by torchinfo,
then what it costs a device (MACs, peak activation RAM and flash, int8), per layer as MCUNet counts
them and in total as TensorFlow Lite Micro needs them (nas.costmodel).

    python -m nas.summary model3          # or model1, model2, or a spec JSON file
"""

from __future__ import annotations

from nas.cli.args import ArgumentParser, fail
from nas.costmodel import tflm_costs
from nas.errors import NasError
from nas.model import summary_table
from nas.spec import cost_lines, load_arch


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m nas.summary", description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="preset name (model1, model2, model3) or a spec JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        arch, _ = load_arch(args.spec)
    except NasError as exc:
        return fail(exc)
    print(f"Input {arch.in_channels}x{arch.input_size}x{arch.input_size}, {arch.num_classes} classes")
    print(summary_table(arch))
    print("\n".join(cost_lines(arch)))
    tflm = tflm_costs(arch)
    print(f"TFLM (int8 .tflite, cost model 'tflm'): arena at most {tflm.peak_ram:,} B, file at most {tflm.flash:,} B")
    return 0
