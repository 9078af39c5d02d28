"""A study's finished trials as a small JSON file that can be committed, and back: the study
outlives its database file, a lost database is rebuilt from it, and a new study starts from it
(python -m nas.export; nas.study.create's warm start).

The file holds the study's config and directions, and for each completed or pruned trial its
params with their distributions, values, intermediate values, user attributes (the run record,
accuracies per epoch, confirm results) and times. Rejected candidates (never trained) are counted,
not listed; failed and running trials are left out and counted. A restore gives each trial its
number back: a failed placeholder holds each left-out number.

Since version 2 the file names each param's distribution once, at the top, and a trial carries
only those of its own that differ (a study whose space changed on resume): repeated in every trial,
they were 60% of a 171-trial export. `load_export` gives every trial all of them again, whichever
version it reads, so the rest of nas sees one form.
"""

from __future__ import annotations

import datetime
import json
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import distribution_to_json, json_to_distribution
from optuna.trial import FrozenTrial, TrialState

from nas.errors import NasError, writing
from nas.study.trials import FINISHED, is_rejected

FORMAT = "nas-study-export"
VERSION = 2  # 1: each trial held all its distributions; 2: they are shared at the top (compact)
LEFT_OUT = "left_out_of_export"  # a restored study's placeholder for a number the export left out


class ExportError(NasError):
    """A file that is not a study export this version can read."""


def _time(value: datetime.datetime | None) -> str | None:
    return value.isoformat() if value else None


def trial_to_dict(trial: FrozenTrial) -> dict[str, Any]:
    return {
        "number": trial.number,
        "state": trial.state.name,
        "values": trial.values,
        "params": trial.params,
        "distributions": {name: json.loads(distribution_to_json(d)) for name, d in trial.distributions.items()},
        "intermediate_values": {str(step): value for step, value in trial.intermediate_values.items()},
        "user_attrs": trial.user_attrs,
        "system_attrs": {k: v for k, v in trial.system_attrs.items() if k == "constraints"},
        "datetime_start": _time(trial.datetime_start),
        "datetime_complete": _time(trial.datetime_complete),
    }


def trial_from_dict(data: dict[str, Any]) -> FrozenTrial:
    """An Optuna trial ready for Study.add_trial (the study it joins numbers it; the exported
    number is kept as the `exported_number` user attribute)."""
    user_attrs = {**data["user_attrs"], "exported_number": data["user_attrs"].get("exported_number", data["number"])}
    trial = optuna.trial.create_trial(
        state=TrialState[data["state"]],
        values=data["values"],
        params=data["params"],
        distributions={name: json_to_distribution(json.dumps(d)) for name, d in data["distributions"].items()},
        intermediate_values={int(step): value for step, value in data["intermediate_values"].items()},
        user_attrs=user_attrs,
        system_attrs=data.get("system_attrs", {}),
    )
    for key in ("datetime_start", "datetime_complete"):
        if data.get(key):
            setattr(trial, key, datetime.datetime.fromisoformat(data[key]))
    return trial


def export_study(study: optuna.Study) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    kept = [t for t in trials if t.state in FINISHED and not is_rejected(t)]
    left_out = Counter("rejected" if is_rejected(t) else t.state.name.lower() for t in trials
                       if t not in kept)
    return {
        "format": FORMAT,
        "version": VERSION,
        "study": study.study_name,
        "directions": [d.name.lower() for d in study.directions],
        "user_attrs": study.user_attrs,
        "left_out": dict(sorted(left_out.items())),
        "trials": [trial_to_dict(t) for t in kept],
    }


def compact(export: dict[str, Any]) -> dict[str, Any]:
    """`export` as the file holds it: each param's most common distribution once, under the top's
    "distributions", and in a trial only the ones that differ from it."""
    counts = Counter((name, json.dumps(d, sort_keys=True))
                     for t in export["trials"] for name, d in t["distributions"].items())
    shared: dict[str, Any] = {}
    for (name, d), _ in counts.most_common():
        shared.setdefault(name, json.loads(d))
    trials = []
    for t in export["trials"]:
        own = {name: d for name, d in t["distributions"].items() if d != shared[name]}
        trials.append({**{k: v for k, v in t.items() if k != "distributions"}, **({"distributions": own} if own else {})})
    return {**export, "version": VERSION, "distributions": dict(sorted(shared.items())), "trials": trials}


def write_export(export: dict[str, Any], path: Path) -> None:
    """`export` as a JSON file at `path`, its directory made; OutputError where it can't be written."""
    with writing(str(path)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(compact(export), indent=1, sort_keys=True) + "\n")


def _expanded(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """A file's export with every trial holding all its distributions (version 1's form)."""
    shared = data.pop("distributions", {})
    for t in data["trials"]:
        own = t.get("distributions", {})
        missing = [name for name in t["params"] if name not in own and name not in shared]
        if missing:
            raise ExportError(f"{path}: trial {t['number']} has no distribution for {', '.join(missing)}")
        t["distributions"] = {name: own.get(name, shared.get(name)) for name in t["params"]}
    return data


def load_export(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ExportError(f"{path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ExportError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ExportError(f"{path}: not a nas study export")
    if data.get("version", 0) > VERSION:
        raise ExportError(f"{path}: export version {data['version']} is newer than this nas reads ({VERSION})")
    return _expanded(data, path)


def restore(export: dict[str, Any], storage: optuna.storages.BaseStorage, name: str | None = None) -> optuna.Study:
    """A new study holding the export's trials, config and attributes; refuses to touch an
    existing study of that name."""
    name = name or export["study"]
    try:
        study = optuna.create_study(storage=storage, study_name=name,
                                    directions=[d for d in export["directions"]])
    except optuna.exceptions.DuplicatedStudyError:
        raise ExportError(f"a study named {name!r} already exists there; restore under another --study") from None
    for key, value in export["user_attrs"].items():
        study.set_user_attr(key, value)
    study.add_trials(numbered_as_exported(export["trials"]))
    return study


def numbered_as_exported(trials: list[dict[str, Any]]) -> list[FrozenTrial]:
    """The export's trials in order, each left-out number (a failed or rejected trial) held by a
    failed placeholder, so that every trial gets its exported number back: the study's stored
    confirm runs, results files and docs name trials by number."""
    filled: list[FrozenTrial] = []
    for data in sorted(trials, key=lambda t: t["number"]):
        while len(filled) < data["number"]:
            filled.append(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={LEFT_OUT: True}))
        filled.append(trial_from_dict(data))
    return filled
