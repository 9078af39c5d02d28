"""nas.model.summary_table and python -m nas.summary: the seed's layer table of a built model."""

from __future__ import annotations

import json

from nas.cli import summary
from nas.model import summary_table
from nas.spec import PRESETS, count_params


def test_model3_table_matches_the_seed_study():
    table = summary_table(PRESETS["model3"].arch)
    assert "Total params: 7,918" in table and "Trainable params: 7,918" in table
    assert "Conv2d-1" in table and "BatchNorm2d-2" in table and "[-1, 10, 28, 28]" in table
    assert table.splitlines()[-1].startswith("Receptive field: 24x24")
    assert "analytic parameter count 7,918" in table


def test_every_preset_table_totals_its_analytic_count():
    for name, preset in PRESETS.items():
        assert f"Total params: {count_params(preset.arch):,}" in summary_table(preset.arch), name


def test_the_command_reads_a_spec_file_and_refuses_a_bad_one_in_one_line(tmp_path, capsys):
    spec = tmp_path / "net.json"
    spec.write_text(json.dumps(PRESETS["model1"].arch.to_dict()))
    assert summary.main([str(spec)]) == 0
    assert "Total params: 7,224" in capsys.readouterr().out
    assert summary.main([str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
