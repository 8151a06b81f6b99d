"""Command line `linft`. Subcommands grow with the project; `demo` runs the main job on the embedded
default."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="linft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="end-to-end NTK on a small model, checked against torch.func")
    demo.add_argument("--samples", type=int, default=16)
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "demo":
        from .demo import run
        return run(samples=args.samples, seed=args.seed)
    return 2
