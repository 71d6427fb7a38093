"""The one entry point: `python launch.py [--config F] [--resume runs/NAME | --init-from RUN/checkpoints/sft_step_N] [key=value ...]`.

Locally it starts a Ray cluster bound to 127.0.0.1; with RAY_ADDRESS set (as under
`ray job submit`) it joins that cluster. Bad config or data: one line on stderr, exit 2,
before a cluster or a run folder exists. A fault the run cannot get past
(actors/supervision.py): one line on stderr, exit 3.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3  # a fault the run could not get past; `--resume` continues it


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from actors.config import describe_sections

    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config sections and their keys (defaults before configs/default.yaml), set as SECTION.KEY=VALUE:\n"
               + describe_sections())
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                        help="continue runs/NAME from its last complete checkpoint")
    parser.add_argument("--init-from", type=Path, default=None, metavar="SFT_CHECKPOINT",
                        help="a new run whose RL starts from another run's RUN/checkpoints/sft_step_N "
                             "(model, world and SFT keys must match that run's)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (file + overrides) as YAML and exit")
    parser.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, e.g. algo.steps=5")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from actors.local_env import apply_process_env

    apply_process_env()  # before Ray is imported: it reads the loopback setting at import
    args = parse_args(argv)
    from actors.config import ConfigError
    from actors.launcher import check_init_from, launch, preflight, resolve_config
    from personadual.data import DataError

    try:
        cfg = resolve_config(args.config, args.overrides, args.resume)
        if args.print_config:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(cfg), end="")
            return 0
        if args.init_from is not None:
            if args.resume is not None:
                raise ConfigError("--init-from starts a new run from a checkpoint; --resume continues one: pass one")
            check_init_from(cfg, args.init_from)
        preflight(cfg)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT

    from actors.supervision import RunStopped

    try:
        launch(cfg, resume=args.resume, init_from=args.init_from)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunStopped as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_STOPPED
    return 0


def exit_now(code: int) -> None:
    """Exit with ``code`` once the exit handlers (W&B's, logging's, Ray's) have run, skipping
    the interpreter's teardown of torch's and Ray's modules: by then the run folder is written
    and the cluster is left, and that teardown cost every run 2 s of one core for nothing."""
    import atexit
    import os

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
