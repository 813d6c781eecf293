"""Command line: ``python -m fusedpeft demo [options]`` and ``python -m fusedpeft serve-demo [options]``
(also the ``fusedpeft`` console script)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fusedpeft", description="fused LoRA / IA3 / SSF kernels for PEFT")
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.required = True
    from . import demo

    demo_parser = sub.add_parser(
        "demo",
        help="train LoRA + IA3 + SSF adapters on a tiny transformer, save and reload them (CPU, seconds)",
        description=demo.__doc__.split("\n\n")[0],
    )
    demo.add_arguments(demo_parser)
    from .serving import demo as serve_demo

    serve_parser = sub.add_parser(
        "serve-demo",
        help="serve 32 random LoRA adapters of mixed ranks in mixed batches, each sequence checked against its "
             "adapter merged (CPU, seconds)",
        description=serve_demo.__doc__.split("\n\n")[0],
    )
    serve_demo.add_arguments(serve_parser)
    args = parser.parse_args(argv)
    if args.command == "serve-demo":
        return serve_demo.run(args)
    if args.command == "demo":
        if args.steps < 1:
            parser.error("--steps must be >= 1")
        return demo.run(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
