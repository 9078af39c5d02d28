"""Experiments about nas itself, each behind a command: the seed study reproduced over seeds
(reproduce), training speed against a reference-style pipeline (bench), and the pruners compared
(fidelity)."""
