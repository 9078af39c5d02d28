"""A study's finished trials as a small JSON file that can be committed, and back: the study
outlives its database file, a lost database is rebuilt from it, and a new study starts from it.

    python -m nas.export --out studies/results/mnist-8k.json
    python -m nas.export --restore studies/results/mnist-8k.json --storage sqlite:///studies/mnist-8k.db

The file holds the study's config and directions, and for each completed or pruned trial its
params with their distributions, values, intermediate values, user attributes (the run record,
accuracies per epoch, confirm results) and times. Rejected candidates (never trained) are counted,
not listed; failed and running trials are left out and counted.
"""

from __future__ import annotations

import datetime
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import distribution_to_json, json_to_distribution
from optuna.trial import FrozenTrial, TrialState

from nas.cli import ArgumentParser
from nas.storage import StorageError, default_url, open_storage
from nas.trials import FINISHED, is_rejected, open_study

FORMAT = "nas-study-export"
VERSION = 1


class ExportError(ValueError):
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
    return data


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
    study.add_trials([trial_from_dict(t) for t in export["trials"]])
    return study


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m nas.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", help="study name (default mnist-8k; with --restore: the exported one's)")
    parser.add_argument("--storage", help="storage URL (default sqlite:///studies/<study>.db)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", type=Path, help="write the export to this JSON file")
    what.add_argument("--restore", type=Path, help="rebuild a study from this export into --storage")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        if args.restore:
            export = load_export(args.restore)
            name = args.study or export["study"]
            url = args.storage or default_url(name)
            study = restore(export, open_storage(url), name)
            print(f"Restored study {name!r} into {url}: {len(export['trials'])} trials")
            return 0
        args.study = args.study or "mnist-8k"
        url = args.storage or default_url(args.study)
        study = open_study(url, args.study)
        export = export_study(study)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(export, indent=1, sort_keys=True) + "\n")
    except (ExportError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    left = ", ".join(f"{n} {k}" for k, n in export["left_out"].items()) or "none"
    print(f"Exported {len(export['trials'])} finished trials of study {args.study!r} to {args.out} "
          f"(left out: {left})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
