"""nas.run: the run record, and what trials stored by earlier versions read back as."""

from __future__ import annotations

import pytest

from nas.run.record import RecordError, RunRecord, record_of


def test_a_record_round_trips_through_a_dict():
    run = RunRecord(device="cuda:1", threads=None, precision="bf16", memory_format="channels_last",
                    batchnorm="native", weight_average=False, compiled=True, subset=500, seed=7)
    assert RunRecord.from_dict(run.to_dict()) == run
    assert record_of({"run": run.to_dict(), "precision": "fp32"}) == run  # the record wins


def test_unknown_keys_and_values_are_refused():
    with pytest.raises(RecordError, match="unknown run record keys: colour"):
        RunRecord.from_dict({"colour": "blue"})
    with pytest.raises(RecordError, match="memory_format"):
        RunRecord(memory_format="nhwc")
    with pytest.raises(RecordError, match="batchnorm"):
        RunRecord(batchnorm="cudnn")


@pytest.mark.parametrize("attrs,expected", [
    ({}, RunRecord(memory_format="nchw", weight_average=False)),  # before any setup attribute
    ({"precision": "fp32"}, RunRecord(memory_format="channels_last", weight_average=False)),
    ({"precision": "bf16", "channels_last": False, "ema": True}, RunRecord(precision="bf16", memory_format="nchw")),
    # the kernel could load, and ran: channels-last fp32 on CPU
    ({"precision": "fp32", "channels_last": True, "batchnorm_kernel": True, "ema": True},
     RunRecord(memory_format="channels_last", batchnorm="native")),
    # it could load, but never runs on NCHW or bf16 tensors
    ({"precision": "fp32", "channels_last": False, "batchnorm_kernel": True, "ema": True}, RunRecord()),
    ({"precision": "bf16", "channels_last": True, "batchnorm_kernel": True, "ema": True},
     RunRecord(precision="bf16", memory_format="channels_last")),
    ({"device": "cuda", "precision": "bf16", "channels_last": True, "threads": 1, "subset": 256, "seed": 3,
      "compiled": True, "ema": True},
     RunRecord(device="cuda", threads=1, precision="bf16", memory_format="channels_last", compiled=True, subset=256,
               seed=3)),
])
def test_trials_of_earlier_versions_read_back_as_they_ran(attrs, expected):
    assert record_of(attrs) == expected
