"""The ``mtlkit`` command line tool.

    mtlkit compare [--config FILE] [--dataset NAME] [--methods a,b] [--seeds N] [--out DIR]
    mtlkit train --method NAME [...]
    mtlkit report DIR
    mtlkit bench speed [...]
    mtlkit models [--input-size 3x512x512] [--tasks pascal_context|nyud]
    mtlkit list

Bad input (unknown method or task, negative learning rate, missing data root, a malformed
config) ends with a one-line error naming the field, and exit status 2 (set MTLKIT_DEBUG=1
for the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from mtlkit import balancers
from mtlkit.engine._dist import rank

EXIT_USAGE = 2


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _load_config(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config: no file {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"config: {p} is not valid YAML ({err.__class__.__name__})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config: {p} must hold a mapping of field: value")  # noqa: TRY004
    return data


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("dataset", "root", "seeds", "epochs", "max_steps", "batch_size", "lr", "out", "device"):
        value = getattr(args, name, None)
        if value is not None:
            out[name] = value
    if getattr(args, "methods", None):
        out["methods"] = _split(args.methods)
    if getattr(args, "method", None):
        out["methods"] = [args.method]
    if getattr(args, "task_lr", None):
        out["task_lr"] = {}
        for item in _split(args.task_lr):
            task, _, lr = item.partition("=")
            try:
                out["task_lr"][task] = float(lr)
            except ValueError:
                raise ValueError(f"task_lr: expected task=lr, got {item!r}") from None
    return out


def cmd_compare(args: argparse.Namespace) -> int:
    from mtlkit.train.compare import compare_config_from_dict, format_table, run_compare
    from mtlkit.train.report import write_report

    data = {**_load_config(args.config), **_overrides(args)}
    if args.quick:
        data.setdefault("epochs", 1)
        data.setdefault("dataset_options", {"size": 600})
    cfg = compare_config_from_dict(data)
    lead = rank() == 0  # under torchrun, rank 0 alone writes and prints
    results = run_compare(cfg, log=lambda s: print(s, file=sys.stderr) if lead else None,
                          resume=args.resume)
    if lead:
        report = write_report(cfg.out)
        print(format_table(results))
        print(f"\nreport: {report}  (results.json, results.csv, report.html and plots beside it)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from mtlkit.train.compare import compare_config_from_dict, train_one

    data = {**_load_config(args.config), **_overrides(args)}
    data.setdefault("out", f"runs/{args.method}")
    cfg = compare_config_from_dict(data)
    result = train_one(cfg, resume=args.resume)
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
    from mtlkit.train._dense_models import DENSE_MODELS, SURVEY_NOTE, complexity_table

    size = parse_size(args.input_size)
    names = _split(args.models) if args.models else list(DENSE_MODELS)
    print(format_complexity(complexity_table(size, args.tasks, names), size))
    print(f"\n{SURVEY_NOTE}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from mtlkit import data

    print("balancers:", ", ".join(balancers.available()))
    print("datasets: ", ", ".join(data.available()))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with the fields of a comparison")
    p.add_argument("--dataset", help="dataset name (default multidigits; see `mtlkit list`)")
    p.add_argument("--root", help="data folder, for datasets read from disk")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", dest="max_steps", type=int,
                   help="stop after this many optimiser steps (the last epoch may be partial)")
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--task-lr", dest="task_lr", help="per-task learning rates: task=lr,task=lr")
    p.add_argument("--device", help="cpu or cuda")
    p.add_argument("--out", help="output folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtlkit", description="Multi-task learning for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compare", help="train single-task baselines and balancers; table + report")
    _common(p)
    p.add_argument("--methods", help="comma-separated balancer names")
    p.add_argument("--seeds", type=int, help="number of seeds (mean ± std)")
    p.add_argument("--quick", action="store_true", help="a tiny run to check the set-up")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted comparison in --out (finished runs are kept)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("train", help="train one method")
    _common(p)
    p.add_argument("--method", required=True, help="balancer name")
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

    p = sub.add_parser("list", help="list balancers and datasets")
    p.set_defaults(func=cmd_list)
    return parser


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
    except (ValueError, KeyError, TypeError, FileNotFoundError) as err:
        if os.environ.get("MTLKIT_DEBUG"):
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"mtlkit: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
