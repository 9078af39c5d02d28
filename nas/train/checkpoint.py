"""A self-describing checkpoint: the spec, training config and run record beside the weights, so a
saved model is rebuilt, and retrained the same way, without the study that produced it."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from nas.model import build_model
from nas.run.record import RunRecord
from nas.spec import ArchSpec, TrainConfig


def checkpoint(arch: ArchSpec, config: TrainConfig, run: RunRecord, model: nn.Module, extra: dict) -> dict:
    """Loadable with weights_only=True; `extra` adds what the caller knows (study, trial, scores)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"arch": arch.to_dict(), "train": config.to_dict(), "run": run.to_dict(), "state_dict": state, **extra}


def load_checkpoint(path: Path) -> tuple[nn.Module, dict]:
    """Rebuild a saved model without the study that produced it."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(ArchSpec.from_dict(saved["arch"]))
    model.load_state_dict(saved["state_dict"])
    return model, saved
