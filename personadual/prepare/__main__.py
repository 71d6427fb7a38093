"""``python -m personadual.prepare {model} ...``: bad input ends with one line and exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m personadual.prepare",
                                     description="Prepare a base model or a run's data files.")
    commands = parser.add_subparsers(dest="command", required=True)
    model = commands.add_parser("model", help="add the mode tokens to a base model")
    model.add_argument("--base", required=True, help="HF model folder (e.g. a Qwen3 snapshot)")
    model.add_argument("--out", required=True, help="folder to write the prepared model to")
    model.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from personadual.data import DataError

    try:
        if args.command == "model":
            from personadual.prepare.model import prepare_model

            report = prepare_model(args.base, args.out, overwrite=args.overwrite)
            print(json.dumps(asdict(report), sort_keys=True))
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
