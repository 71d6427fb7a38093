"""The one entry point: `python launch.py [--config F] [--resume runs/NAME] [key=value ...]`.

Locally it starts a Ray cluster bound to 127.0.0.1; with RAY_ADDRESS set (as under
`ray job submit`) it joins that cluster. Bad config or data: one line on stderr, exit 2.
A fault the run cannot get past (actors/supervision.py): one line on stderr, exit 3.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3  # a fault the run could not get past; `--resume` continues it


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                        help="continue runs/NAME from its last complete checkpoint")
    parser.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, e.g. algo.steps=5")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from actors.local_env import apply_process_env

    apply_process_env()  # before Ray is imported: it reads the loopback setting at import
    from actors.config import ConfigError
    from actors.launcher import launch
    from actors.supervision import RunStopped
    from personadual.data import DataError

    try:
        launch(config_path=args.config, overrides=args.overrides, resume=args.resume)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunStopped as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_STOPPED
    return 0


if __name__ == "__main__":
    sys.exit(main())
