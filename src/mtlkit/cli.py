"""The ``mtlkit`` command line tool: a thin layer over :mod:`mtlkit.experiment`.

    mtlkit compare [--config FILE] [--set key=value ...] [--dataset D] [--model M] [...]
    mtlkit train [--method NAME] [same options]
    mtlkit report DIR
    mtlkit bench speed [...]
    mtlkit models [--input-size 3x512x512] [--tasks pascal_context|nyud]
    mtlkit list
    mtlkit --version

Options are applied in this order: the config file, then the flags, then each ``--set``.
Bad input (unknown method or task, negative learning rate, missing data root, a malformed
config, a device this machine lacks, a corrupt checkpoint, a loss that became NaN) ends with a
one-line error naming the field or file, and exit status 2 (set MTLKIT_DEBUG=1 for the
traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mtlkit import __version__, balancers
from mtlkit.engine._dist import rank

EXIT_USAGE = 2


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _experiment_data(args: argparse.Namespace) -> dict[str, Any]:
    """The config's fields: file, then flags, then ``--set`` (later wins)."""
    from mtlkit.experiment import QUICK, apply_override, read_config_file

    data: dict[str, Any] = {}
    if args.config is not None:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"config: no file {path}")
        data = read_config_file(path)
    for name in ("dataset", "model", "root", "epochs", "max_steps", "batch_size", "out",
                 "device"):
        value = getattr(args, name, None)
        if value is not None:
            data[name] = value
    if getattr(args, "seeds", None) is not None:
        data["seeds"] = args.seeds
    if args.lr is not None:
        apply_override(data, f"optimizer.lr={args.lr!r}")
    if getattr(args, "methods", None):
        data["methods"] = _split(args.methods)
    if getattr(args, "method", None):
        data["methods"] = [args.method]
    if args.task_lr:
        data["task_lr"] = {}
        for item in _split(args.task_lr):
            task, _, lr = item.partition("=")
            try:
                data["task_lr"][task] = float(lr)
            except ValueError:
                raise ValueError(f"task_lr: expected task=lr, got {item!r}") from None
    for item in args.set or []:
        apply_override(data, item)
    if getattr(args, "quick", False):
        for key, value in QUICK.items():
            data.setdefault(key, value)
    return data


def cmd_compare(args: argparse.Namespace) -> int:
    from mtlkit.experiment import Experiment, compare
    from mtlkit.train.compare import format_table

    exp = Experiment.from_dict(_experiment_data(args))
    lead = rank() == 0  # under torchrun, rank 0 alone writes and prints
    results = compare(exp, resume=args.resume,
                      log=lambda s: print(s, file=sys.stderr) if lead else None)
    if lead:
        print(format_table(results))
        out = Path(exp.out or "reports/compare")
        print(f"\nreport: {out / 'report.md'}  (results.json, results.csv, report.html and "
              f"plots beside it)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from mtlkit.experiment import Experiment, train

    result = train(Experiment.from_dict(_experiment_data(args)), resume=args.resume)
    if rank() == 0:
        print(json.dumps({"method": result.method, "selected_epoch": result.selected_epoch,
                          "test": result.test}, indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mtlkit.train.compare import format_table
    from mtlkit.train.report import write_report

    path = write_report(args.dir)
    print(format_table(json.loads((Path(args.dir) / "results.json").read_text())))
    print(f"\nreport: {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from mtlkit.benchmarks import speed

    return int(speed.run(args))


def cmd_models(args: argparse.Namespace) -> int:
    from mtlkit.nn._complexity import format_complexity, parse_size
    from mtlkit.train._dense_models import (
        DENSE_MODELS,
        SURVEY_NOTE,
        complexity_table,
        survey_block,
    )

    size = parse_size(args.input_size)
    names = _split(args.models) if args.models else list(DENSE_MODELS)
    print(format_complexity(complexity_table(size, args.tasks, names), size))
    print(f"\nBeside the survey's table ({args.tasks}):\n")
    print(survey_block(args.tasks, size))
    print(f"\n{SURVEY_NOTE}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from mtlkit import data
    from mtlkit.train.models import available_models

    print("balancers:", ", ".join(balancers.available()))
    print("datasets: ", ", ".join(data.available()))
    print("models:   ", ", ".join(available_models()))
    return 0


def _defaults() -> dict[str, Any]:
    from mtlkit.experiment import Experiment

    return _flatten(Experiment().to_dict())


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, Mapping) and v and k not in ("hparams",):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _fields_epilog() -> str:
    lines = ["config fields (YAML keys, or --set key=value; default in brackets):"]
    notes = {"model": "the dataset's default model", "out": "reports/compare | runs/<method>",
             "keep_checkpoint": "none for compare, last for train",
             "max_steps": "whole epochs", "root": "none", "max_samples": "all",
             "grad_clip": "none", "amp": "none"}
    for key, value in _defaults().items():
        shown = notes.get(key, json.dumps(value))
        lines.append(f"  {key:<24} [{shown}]")
    lines.append("see `pydoc mtlkit.experiment` for what each field means; "
                 "configs/ holds papers' protocols")
    return "\n".join(lines)


def _common(p: argparse.ArgumentParser) -> None:
    d = _defaults()
    p.add_argument("--config", help="YAML file with the fields of an experiment (see below)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="set any field, e.g. --set optimizer.lr=1e-4 --set "
                        "hparams.mgda.grad_on=features (repeatable; applied last)")
    p.add_argument("--dataset", help=f"registered name (`mtlkit list`) or package.module:function "
                                     f"returning a DatasetBundle (default: {d['dataset']})")
    p.add_argument("--model", help="registered name (`mtlkit list`) or package.module:function"
                                   "(tasks, input_shape, **options) (default: the dataset's)")
    p.add_argument("--root", help="data folder, for datasets read from disk (default: none)")
    p.add_argument("--epochs", type=int, help=f"(default: {d['epochs']})")
    p.add_argument("--max-steps", dest="max_steps", type=int,
                   help="stop after this many optimiser steps, the last epoch may be partial "
                        "(default: whole epochs)")
    p.add_argument("--batch-size", dest="batch_size", type=int,
                   help=f"(default: {d['batch_size']})")
    p.add_argument("--lr", type=float, help=f"optimizer.lr (default: {d['optimizer.lr']})")
    p.add_argument("--task-lr", dest="task_lr",
                   help="per-task learning rates: task=lr,task=lr (default: none)")
    p.add_argument("--seeds", type=int, help=f"number of seeds (default: {d['seeds']})")
    p.add_argument("--device", help=f"cpu, cuda, cuda:1, mps (default: {d['device']})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtlkit", description="Multi-task learning for PyTorch.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    epilog = _fields_epilog()
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("compare", help="train single-task baselines and balancers; table + report",
                       epilog=epilog, formatter_class=fmt)
    _common(p)
    d = _defaults()
    p.add_argument("--methods", help=f"comma-separated balancer names "
                                     f"(default: {','.join(d['methods'])})")
    p.add_argument("--out", help="output folder (default: reports/compare)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny run to check the set-up, on any dataset: sets "
                        "epochs=1, max_steps=5, max_samples=64 where the config leaves them unset")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted comparison in --out (finished runs are kept)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("train", help="train one method", epilog=epilog, formatter_class=fmt)
    _common(p)
    p.add_argument("--method", help="balancer name (default: the first of the config's methods)")
    p.add_argument("--out", help="output folder (default: runs/<method>)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("report", help="rebuild the report of a compare run from its files")
    p.add_argument("dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("bench", help="benchmarks")
    bench = p.add_subparsers(dest="bench", required=True)
    speed_parser = bench.add_parser("speed", help="step time and memory of each balancer")
    from mtlkit.benchmarks import speed

    speed.add_arguments(speed_parser)
    speed_parser.set_defaults(func=cmd_bench)

    p = sub.add_parser("models", help="parameters and FLOPs of the dense-prediction models")
    p.add_argument("--input-size", dest="input_size", default="3x512x512", help="CxHxW")
    p.add_argument("--tasks", default="pascal_context", help="pascal_context or nyud task set")
    p.add_argument("--models", help="comma-separated registered models (default: all six)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("list", help="list balancers, datasets and models")
    p.set_defaults(func=cmd_list)
    return parser


def _version() -> str:
    import torch

    return f"mtlkit {__version__} (torch {torch.__version__})"


def _start_distributed(args: argparse.Namespace) -> bool:
    """Join the process group when started by torchrun (``WORLD_SIZE`` > 1) for a command that
    trains; True when this call started it."""
    import torch.distributed as dist

    if args.func not in (cmd_train, cmd_compare) or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    if dist.is_initialized():
        return False
    cuda = str(getattr(args, "device", None) or "").startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = _start_distributed(args)
    try:
        return int(args.func(args))
    except ImportError as err:  # an optional dependency is missing
        if os.environ.get("MTLKIT_DEBUG"):
            raise
        print(f"mtlkit: error: {err}; the command line tool needs the extras: "
              f"pip install 'mtlkit[cli]'", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, KeyError, TypeError, OSError) as err:
        if os.environ.get("MTLKIT_DEBUG"):
            raise
        msg = str(err.args[0] if isinstance(err, KeyError) and err.args else err)
        print(f"mtlkit: error: {' '.join(msg.split())}", file=sys.stderr)  # one line
        return EXIT_USAGE
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
