"""The ``mtlkit`` command line tool."""

from __future__ import annotations

import argparse
import sys

import torch

from mtlkit import balancers


def _compare_random(args: argparse.Namespace) -> int:
    """Interim ``compare``: train a tiny two-task model on random data with each balancer."""
    names = args.methods.split(",")
    for name in names:
        balancers.get(name)
    print(f"{'method':<14}{'loss a':>10}{'loss b':>10}")
    for name in names:
        torch.manual_seed(0)
        trunk = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh())
        heads = torch.nn.ModuleDict({t: torch.nn.Linear(16, 1) for t in ("a", "b")})
        b = balancers.create(name, tasks=["a", "b"])
        opt = torch.optim.Adam([*trunk.parameters(), *heads.parameters(), *b.parameters()], 1e-2)
        x = torch.randn(256, 8)
        y = {"a": x[:, :1].sin(), "b": 100 * x[:, 1:2]}
        for _ in range(200):
            opt.zero_grad()
            z = trunk(x)
            losses = {t: (heads[t](z) - y[t]).pow(2).mean() for t in ("a", "b")}
            b.backward(losses, shared=trunk.parameters(), features=z)
            opt.step()
        print(f"{name:<14}{losses['a'].item():>10.4f}{losses['b'].item():>10.2f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtlkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    compare = sub.add_parser("compare", help="compare balancers")
    compare.add_argument("--methods", default="ew,uw,dwa,geometric")
    compare.set_defaults(func=_compare_random)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, KeyError, TypeError, FileNotFoundError) as err:
        print(f"mtlkit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
