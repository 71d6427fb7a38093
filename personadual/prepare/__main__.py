"""``python -m personadual.prepare {model,data} ...``: bad input ends with one line and exit code 2.

This is an entry point like ``launch.py``: it wires the reward room's scorers into data
preparation (the teacher's trajectories are scored as a run would score them); the modules of
``personadual.prepare`` themselves import nothing above ``personadual``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from personadual.data import DataError

EXIT_BAD_INPUT = 2
EXIT_ENDPOINT_FAILED = 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m personadual.prepare",
                                     description="Prepare a base model or a run's data files.")
    commands = parser.add_subparsers(dest="command", required=True)
    model = commands.add_parser("model", help="add the mode tokens to a base model")
    model.add_argument("--base", required=True, help="HF model folder (e.g. a Qwen3 snapshot)")
    model.add_argument("--out", required=True, help="folder to write the prepared model to")
    model.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    data = commands.add_parser("data", help="write a run's SFT, RL and eval files from a recipe")
    data.add_argument("--recipe", required=True, help="recipe YAML (configs/recipe_tiny.yaml, recipe_paper.yaml)")
    data.add_argument("--no-progress", action="store_true", help="no progress bars")
    data.add_argument("--skip-invalid", action="store_true",
                      help="skip invalid rows of every dataset and count them in the manifests "
                           "instead of exiting 2")
    data.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, e.g. out_dir=/data/run1")
    tiny = commands.add_parser("tiny-models", help="a base without mode tokens and a teacher that knows a "
                                                   "tiny recipe's rows, to run the recipe on a CPU")
    tiny.add_argument("--recipe", default="configs/recipe_tiny.yaml", help="the recipe whose rows the teacher learns")
    tiny.add_argument("--out", default="models", help="writes OUT/tiny_base and OUT/tiny_teacher")
    tiny.add_argument("--overwrite", action="store_true", help="replace them if they exist")
    return parser.parse_args(argv)


def judge_messages(prompt, response: str) -> list[dict[str, str]]:
    """The run's judge chat, which the tiny teacher learns to answer."""
    from rewards.config import JudgeConfig
    from rewards.judge import build_messages

    return build_messages(prompt, response, JudgeConfig().max_response_chars)


def teacher_scorer(reward: object, cache_dir: object):
    """Scores (prompt, response) pairs with the run's own scorers (the recipe's ``reward``);
    judge verdicts are cached on disk with the other endpoint calls unless the recipe says
    where."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from rewards.config import RewardConfig
    from rewards.scorer import BatchScorer

    try:
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RewardConfig), reward))
        if config.judge.cache_path is None:
            config.judge.cache_path = str(Path(str(cache_dir)) / "judge_verdicts.jsonl")
        scorer = BatchScorer(config)
    except (OmegaConfBaseException, ValueError) as error:  # each names its key
        key = getattr(error, "full_key", None)
        raise DataError(f"reward.{key + ': ' if key else ' '}{(str(error).splitlines() or ['invalid'])[0]}") from None

    def score(items):
        outcomes, counts = scorer.score_texts(list(items))
        return [bool(o.correct) and o.status != "dropped" for o in outcomes], counts

    return score


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "model":
            from personadual.prepare.model import prepare_model

            report = prepare_model(args.base, args.out, overwrite=args.overwrite)
            print(json.dumps(asdict(report), sort_keys=True))
        elif args.command == "tiny-models":
            from personadual.prepare.recipe import load_recipe
            from personadual.prepare.tiny_models import build_tiny_models

            written = build_tiny_models(load_recipe(args.recipe), Path(args.out), judge_messages,
                                        overwrite=args.overwrite)
            print(json.dumps(written, sort_keys=True))
        else:
            from personadual.prepare.data import prepare_data
            from personadual.prepare.recipe import load_recipe

            if args.no_progress:
                import datasets

                datasets.disable_progress_bars()
            recipe = load_recipe(args.recipe, [*args.overrides, *(["skip_invalid=true"] if args.skip_invalid else [])])
            manifests = prepare_data(recipe, teacher_scorer(recipe.reward, recipe.cache) if recipe.sft else None,
                                     progress=not args.no_progress)
            for manifest in manifests.values():
                print(json.dumps({k: manifest[k] for k in ("file", "rows", "sha256", "dropped")}, sort_keys=True))
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as error:
        from personadual.benchmarks.personas import AlignedPersonaError
        from personadual.prepare.calls import EndpointError
        from rewards.config import RewardConfigError
        from rewards.judge import JudgeError

        if isinstance(error, RewardConfigError):  # the judge's key variable, checked at first use
            print(f"error: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if not isinstance(error, (AlignedPersonaError, EndpointError, JudgeError)):
            raise
        # An endpoint that failed for good: what it answered is cached, a re-run continues.
        print(f"error: {error}; finished calls are cached, run the command again to continue",
              file=sys.stderr)
        return EXIT_ENDPOINT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
