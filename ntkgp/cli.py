"""The ``ntkgp`` command: ``ntkgp list``, ``ntkgp --version`` and
``ntkgp run NAME [--config tiny] [--device cpu] [--seed 0] [--out results]``.

Experiments are found through the ``ntkgp.experiments`` entry-point group, and through the package
``ntkgp_experiments`` (the folder ``experiments/`` of the repository, installed under that name) if importable. The
library itself never imports them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from . import __version__

__all__ = ["discover_experiments", "main"]


def discover_experiments() -> dict:
    """name -> Experiment, from entry points, then from the ``ntkgp_experiments`` package if importable."""
    found: dict[str, EntryPoint | str] = {}
    for entry in entry_points(group="ntkgp.experiments"):
        found[entry.name] = entry
    try:
        package = importlib.import_module("ntkgp_experiments")
    except ImportError:
        package = None
    if package is not None:
        for info in pkgutil.iter_modules(package.__path__):
            found.setdefault(info.name, f"ntkgp_experiments.{info.name}")
    experiments = {}
    for source in found.values():
        loaded = importlib.import_module(source) if isinstance(source, str) else source.load()
        experiment = loaded if hasattr(loaded, "configs") else getattr(loaded, "EXPERIMENT", None)
        if experiment is not None:
            experiments[experiment.name] = experiment
    return experiments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ntkgp", description="NTK Gaussian processes: experiments")
    parser.add_argument("--version", action="version", version=f"ntkgp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the experiments")
    run = sub.add_parser("run", help="run an experiment")
    run.add_argument("name")
    run.add_argument("--config", default="default", help="named configuration (default, tiny, paper, ...)")
    run.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", type=Path, default=Path("results"), help="results root (default ./results)")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one configuration setting; VALUE is read as JSON, else as a string "
        "(e.g. --set scope=all --set shots=[1,5])",
    )
    run.add_argument(
        "--fresh",
        action="store_true",
        help="start over: discard OUT/NAME/results.json (by default a rerun with the same configuration "
        "and seed resumes where the last one stopped)",
    )
    args = parser.parse_args(argv)
    experiments = discover_experiments()
    if args.command == "list":
        for name, experiment in sorted(experiments.items()):
            print(f"{name:20s} {experiment.description}  [configs: {', '.join(experiment.configs)}]")
        return 0
    if args.name not in experiments:
        parser.error(f"unknown experiment {args.name!r}; known: {', '.join(sorted(experiments))}")
    experiment = experiments[args.name]
    if args.config not in experiment.configs:
        parser.error(f"experiment {args.name!r} has configs {list(experiment.configs)}, not {args.config!r}")
    config = dict(experiment.configs[args.config])
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in config:
            parser.error(f"--set takes KEY=VALUE with KEY one of {sorted(config)}, got {item!r}")
        try:
            config[key] = json.loads(value)
        except json.JSONDecodeError:
            config[key] = value
    if args.fresh:
        (args.out / args.name / "results.json").unlink(missing_ok=True)
    experiment.run(config, args.out / args.name, args.device, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
