"""``prepare tiny-models``: the tiny teacher is trained on every chat the tiny recipe's
preparation sends its server (the persona writer's, the teacher's in the modes it asks, and the
judge's on the answers it was taught), built the way ``prepare data`` builds them, so the two
cannot drift apart unnoticed."""

from __future__ import annotations

from pathlib import Path

from personadual.benchmarks.personas import PersonaPool, persona_messages
from personadual.benchmarks.registry import load_benchmark
from personadual.modes import Mode
from personadual.prepare.__main__ import judge_messages
from personadual.prepare.recipe import load_recipe
from personadual.prepare.teacher import plan_asks
from personadual.prepare.tiny_models import DOMAIN_PERSONAS, _DomainWriter, recipe_examples

ROOT = Path(__file__).resolve().parent.parent


def test_the_teacher_learns_every_chat_the_tiny_recipe_sends_and_the_answers_the_selection_needs(tmp_path):
    recipe = load_recipe(ROOT / "configs" / "recipe_tiny.yaml", [f"hub_cache_dir={tmp_path}"])
    examples = recipe_examples(recipe, judge_messages)
    replies = {e.messages: e.reply for e in examples}
    pool, writer = PersonaPool.load(recipe.persona_hub, recipe.hub_cache_dir), _DomainWriter()

    def prompts(configs):
        return [p for c in configs for p in load_benchmark(
            c.name, c.source, split=c.split, subset=c.subset, limit=c.limit, persona_settings=c.persona_settings,
            persona_assignment=c.persona_assignment, scorer=c.scorer, personas=pool, aligned=writer,
            seed=c.seed, cache_dir=recipe.hub_cache_dir)]

    sft = prompts(recipe.sft)
    prompts(recipe.rl), prompts(recipe.eval)
    for request in writer.requests.values():
        reply = replies[tuple((m["role"], m["content"]) for m in persona_messages(recipe.persona_writer, request))]
        assert reply == DOMAIN_PERSONAS[request.question_id.split("-", 1)[0]]
    asks = plan_asks(sft, recipe.samples_per_mode)
    assert {a.prompt.persona_setting for a in asks} == {"none", "unaligned", "aligned"}
    for ask in asks:
        reply = replies[tuple((m["role"], m["content"]) for m in ask.request().as_messages())]
        right = ask.mode == Mode.GENERAL or ask.prompt.persona_setting != "unaligned"
        assert reply.endswith(f"Answer: {ask.prompt.gold[0]}") == right, (ask.prompt.id, ask.mode, reply)
        if ask.prompt.scorer == "judge":
            verdict = replies[tuple((m["role"], m["content"])
                                    for m in judge_messages(ask.prompt, f"{ask.mode.token} {reply}"))]
            assert f'"correct": {"true" if right else "false"}' in verdict
