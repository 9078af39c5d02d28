"""Layer table of an architecture in the seed study's style, measured on the built model by torchinfo.

    python -m nas.summary model3          # or model1, model2, or a spec JSON file
"""

from __future__ import annotations

import sys

import torchinfo

from nas.model import BatchNormAct2d, build_model
from nas.spec import ArchSpec, SpecError, count_params, layer_table, load_arch
from nas.cli import ArgumentParser

RULE = "-" * 64
DOUBLE_RULE = "=" * 64


def summary_table(arch: ArchSpec) -> str:
    """The seed's table (layer, output shape, params, totals) followed by receptive fields."""
    model = build_model(arch)
    stats = torchinfo.summary(
        model, input_size=(1, arch.in_channels, arch.input_size, arch.input_size), verbose=0, device="cpu"
    )
    lines = [RULE, f"{'Layer (type)':>20}  {'Output Shape':>25} {'Param #':>15}", DOUBLE_RULE]
    index = 0
    for layer in stats.summary_list:
        fused = isinstance(layer.module, BatchNormAct2d)  # the seed's BatchNorm2d row; its ReLU follows
        if (layer.children and not fused) or layer.class_name == "Flatten":
            continue  # containers, and the flatten that only drops two unit dimensions
        index += 1
        shape = str([-1, *layer.output_size[1:]])
        name = "BatchNorm2d" if fused else layer.class_name
        lines.append(f"{f'{name}-{index}':>20}  {shape:>25} {layer.num_params:>15,}")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines += [
        DOUBLE_RULE,
        f"Total params: {total:,}",
        f"Trainable params: {trainable:,}",
        f"Non-trainable params: {total - trainable:,}",
        RULE,
    ]
    lines.append(receptive_field_line(arch))
    return "\n".join(lines)


def receptive_field_line(arch: ArchSpec) -> str:
    fields = [row.receptive_field for row in layer_table(arch) if row.name in ("conv3x3", "conv1x1", "maxpool")]
    return (
        f"Receptive field: {fields[-1]}x{fields[-1]} before global average pooling "
        f"(per layer: {' '.join(map(str, fields))}); analytic parameter count {count_params(arch):,}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m nas.summary", description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="preset name (model1, model2, model3) or a spec JSON file")
    args = parser.parse_args(argv)
    try:
        arch, _ = load_arch(args.spec)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary_table(arch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
