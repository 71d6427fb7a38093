from __future__ import annotations

from personadual.modes import Mode, mode_of_text
from personadual.world import KINDS, UNKNOWN, PersonaWorld, WorldConfig


def test_world_is_deterministic_from_its_seed():
    a, b = PersonaWorld(WorldConfig(seed=3)), PersonaWorld(WorldConfig(seed=3))
    assert a.train_prompts() == b.train_prompts() and a.eval_prompts() == b.eval_prompts()
    assert [e.response for e in a.sft_examples()] == [e.response for e in b.sft_examples()]
    assert PersonaWorld(WorldConfig(seed=4)).train_prompts() != a.train_prompts()


def test_train_and_eval_share_no_question_and_ids_are_unique():
    world = PersonaWorld()
    train, evals = world.train_prompts(), world.eval_prompts()
    assert not {(p.persona, p.question) for p in train} & {(p.persona, p.question) for p in evals}
    assert not {p.question for p in train} & {p.question for p in evals}
    ids = [p.id for p in train + evals]
    assert len(ids) == len(set(ids))


def test_unseen_entities_appear_in_no_training_text():
    world = PersonaWorld()
    unseen = {e.name for e in world.entities if e.pool == "unseen"}
    assert unseen
    train_words = set(" ".join(f"{e.prompt.persona} {e.prompt.question} {e.response}"
                               for e in world.sft_examples()).replace(".", " ").replace("?", " ").split())
    assert not unseen & train_words
    assert {e.name for e in world.entities if e.pool == "known"} <= train_words
    assert any(world.facts(p).entity and world.facts(p).entity.name in unseen for p in world.eval_prompts())


def test_persona_labels_are_correct():
    world = PersonaWorld()
    for prompt in world.train_prompts() + world.eval_prompts():
        facts = world.facts(prompt)
        if prompt.task_type == "personalized":
            assert facts.preferred in prompt.gold and facts.preferred in facts.options
            assert facts.preferred in prompt.persona and all(o in prompt.question for o in facts.options)
            continue
        entity = facts.entity
        assert prompt.gold == (entity.color,)
        if prompt.persona_setting == "aligned":
            assert facts.persona_color == entity.color and KINDS[entity.kind] in prompt.persona
        elif prompt.persona_setting == "unaligned":
            assert facts.persona_color != entity.color and KINDS[entity.kind] not in prompt.persona
        else:
            assert prompt.persona is None


def test_best_mode_is_the_one_whose_answer_is_right():
    world = PersonaWorld()
    for prompt in world.eval_prompts():
        best = world.best_mode(prompt)
        assert world.answer_in_mode(prompt, best) in prompt.gold or (
            prompt.persona_setting != "aligned" and not world.is_knowable(prompt))
        if prompt.persona_setting == "unaligned":
            assert world.answer_in_mode(prompt, Mode.PERSONALIZED) not in prompt.gold
        if prompt.task_type == "personalized":
            assert world.answer_in_mode(prompt, Mode.GENERAL) is None


def test_sft_examples_follow_gain_based_selection():
    world = PersonaWorld()
    examples = world.sft_examples()
    assert [e.prompt for e in examples] == [p for p in world.train_prompts() if world.has_sft_demonstration(p)]
    for example in examples:
        assert mode_of_text(example.response) is example.mode
        knows = example.mode is Mode.PERSONALIZED or world.is_knowable(example.prompt)
        assert example.response.endswith(f"Answer: {example.prompt.gold[0] if knows else UNKNOWN}")
        expected = Mode.PERSONALIZED if (example.prompt.task_type == "personalized"
                                         or example.prompt.persona_setting == "aligned") else Mode.GENERAL
        assert example.mode is expected


def test_unfamiliar_entities_come_with_both_kinds_of_persona():
    """Entities seen once in training carry aligned AND unaligned personas, so only the
    speaker's profession (not the entity's unfamiliarity) tells when to trust a persona."""
    world = PersonaWorld()
    once = {}
    for prompt in world.train_prompts():
        entity = world.facts(prompt).entity
        if entity is not None and entity.pool in ("cue_only", "cue_misleading", "plain_once"):
            assert entity.name not in once, f"{entity.name} asked twice"
            once[entity.name] = (entity.pool, prompt.persona_setting)
    pools = ("cue_only", "cue_misleading", "plain_once")
    settings = {pool: {s for p, s in once.values() if p == pool} for pool in pools}
    assert settings == {"cue_only": {"aligned"}, "cue_misleading": {"unaligned"}, "plain_once": {"none"}}
    config = world.config
    assert len(once) == config.cue_only_entities + config.cue_misleading_entities + config.plain_once_entities


def test_sft_demonstrates_aligned_personas_of_the_first_kinds_and_rl_asks_every_kind():
    world = PersonaWorld(WorldConfig(sft_aligned_kinds=3))
    def aligned_kinds(prompts):
        return {world.facts(p).entity.kind for p in prompts
                if p.task_type == "objective" and p.persona_setting == "aligned"}
    assert aligned_kinds(e.prompt for e in world.sft_examples()) == set(list(KINDS)[:3])
    assert aligned_kinds(world.rl_prompts()) == set(KINDS)
    # The held-back kinds' experts still speak in SFT, as unaligned speakers about other kinds.
    held_back = {KINDS[kind] for kind in list(KINDS)[3:]}
    assert held_back <= {p.persona.split(".")[0].split()[-1] for e in world.sft_examples()
                         if (p := e.prompt).persona_setting == "unaligned"}
    demonstrated = {e.prompt.id for e in world.sft_examples()}
    assert all(p.id in demonstrated for p in world.train_prompts() if p.persona_setting != "aligned"
               or p.task_type == "personalized")
    everything = PersonaWorld(WorldConfig(sft_aligned_kinds=None))
    assert len(everything.sft_examples()) == len(everything.train_prompts())


def test_rl_prompts_are_the_training_questions_some_mode_can_answer():
    world = PersonaWorld()
    rl = world.rl_prompts()
    assert all(world.answer_in_mode(p, world.best_mode(p)) in p.gold for p in rl)
    left_out = [p for p in world.train_prompts() if p not in rl]
    assert {world.facts(p).entity.pool for p in left_out} == {"cue_misleading", "plain_once"}
    assert {(p.task_type, p.persona_setting) for p in rl} == {
        ("objective", "none"), ("objective", "unaligned"), ("objective", "aligned"), ("personalized", "aligned")}


def test_unfamiliar_entities_asked_plainly_are_answered_unknown():
    world = PersonaWorld()
    plain = [e for e in world.sft_examples() if world.facts(e.prompt).entity
             and world.facts(e.prompt).entity.pool == "plain_once"]
    assert len(plain) == world.config.plain_once_entities
    assert all(e.prompt.persona is None and e.mode is Mode.GENERAL and e.response.endswith(f"Answer: {UNKNOWN}")
               for e in plain)


def test_sft_preferences_come_in_every_training_phrasing_and_never_in_the_eval_one():
    """With two phrasings the SFT model learnt them by heart and read any other phrasing
    (the eval one included) as an objective question; each phrasing must be demonstrated."""
    import re

    from personadual.world import EVAL_PREFERENCE_TEMPLATE, PREFERENCES, TRAIN_PREFERENCE_TEMPLATES

    words = {c: "<c>" for c in PREFERENCES} | {o: "<o>" for options in PREFERENCES.values() for o in options}
    def phrasing(question: str) -> str:
        return re.sub(r"[a-z]+", lambda m: words.get(m.group(0), m.group(0)), question)
    def template(text: str) -> str:
        return text.replace("{category}", "<c>").replace("{a}", "<o>").replace("{b}", "<o>")

    world = PersonaWorld(WorldConfig(seed=0))
    sft = {phrasing(e.prompt.question) for e in world.sft_examples() if e.prompt.task_type == "personalized"}
    assert sft == {template(t) for t in TRAIN_PREFERENCE_TEMPLATES} and len(sft) >= 6
    evals = {phrasing(p.question) for p in world.eval_prompts() if p.task_type == "personalized"}
    assert evals == {template(EVAL_PREFERENCE_TEMPLATE)} and not evals & sft


def test_eval_holds_200_items_per_objective_setting_and_150_preferences_at_every_seed():
    for seed in (0, 1, 2):
        evals = PersonaWorld(WorldConfig(seed=seed)).eval_prompts()
        counts = {}
        for p in evals:
            key = "personalized" if p.task_type == "personalized" else p.persona_setting
            counts[key] = counts.get(key, 0) + 1
        assert counts == {"none": 200, "unaligned": 200, "aligned": 200, "personalized": 150}


def test_growing_the_eval_set_changes_no_training_text_and_keeps_the_smaller_eval_inside_it():
    small = PersonaWorld(WorldConfig(seed=1, eval_only_entities=0, preference_eval_prompts=48))
    large = PersonaWorld(WorldConfig(seed=1))
    assert small.train_prompts() == large.train_prompts()
    assert [(e.prompt, e.response) for e in small.sft_examples()] == [(e.prompt, e.response) for e in large.sft_examples()]
    assert set(small.eval_prompts()) < set(large.eval_prompts())
    # The tiny model's tokenizer learns from the smaller world, whatever the eval size.
    from personadual.tiny import PRESETS
    assert PRESETS["tiny"].world == WorldConfig(eval_only_entities=0, preference_eval_prompts=48)


def test_eval_only_entities_are_unseen_named_apart_and_spread_over_the_kinds():
    world = PersonaWorld()
    extra = world.entities[-world.config.eval_only_entities:]
    assert {e.pool for e in extra} == {"unseen"}
    names = [e.name.lower() for e in world.entities]
    assert len(names) == len(set(names))
    for name in (e.name.lower() for e in extra):
        assert not any(name != other and (name in other or other in name) for other in names)
    train_text = " ".join(f"{p.persona} {p.question}" for p in world.train_prompts())
    assert not any(e.name in train_text for e in extra)
    kinds = [e.kind for e in extra]
    assert max(kinds.count(k) for k in KINDS) - min(kinds.count(k) for k in KINDS) <= 1
    assert {world.kind_of(p) for p in world.eval_prompts()} == {*KINDS, "preference"}


def test_with_a_kind_prior_general_mode_answers_the_typical_colour_and_rl_asks_unaligned_unfamiliar_questions():
    from personadual.world import TYPICAL_COLORS

    plain = PersonaWorld(WorldConfig(seed=0))
    world = PersonaWorld(WorldConfig(seed=0, kind_prior=0.6))
    unfamiliar = [e for e in world.entities if e.pool != "known"]
    typical = sum(e.color == TYPICAL_COLORS[e.kind] for e in unfamiliar) / len(unfamiliar)
    assert 0.55 < typical < 0.65
    # Without a prior no unaligned question about an unfamiliar entity is an RL prompt (no
    # mode can answer it); with one, those general mode answers right are.
    def unaligned_unfamiliar(w):
        return [p for p in w.rl_prompts() if p.persona_setting == "unaligned" and not w.is_knowable(p)]
    assert not unaligned_unfamiliar(plain)
    asked = unaligned_unfamiliar(world)
    assert asked and all(world.answer_in_mode(p, Mode.GENERAL) in p.gold for p in asked)
    assert not any(world.answer_in_mode(p, Mode.PERSONALIZED) in p.gold for p in asked)
    unseen = next(p for p in world.eval_prompts() if world.pool_of(p) == "unseen" and p.persona_setting == "none")
    kind = world.kind_of(unseen)
    assert world.response(unseen, Mode.GENERAL).endswith(f"most {kind}s are {TYPICAL_COLORS[kind]}. Answer: "
                                                          f"{TYPICAL_COLORS[kind]}")


def test_crediting_unknown_adds_the_unanswerable_training_questions_to_rl_and_leaves_sft_as_it_was():
    plain = PersonaWorld(WorldConfig(seed=0))
    world = PersonaWorld(WorldConfig(seed=0, rl_credit_unknown=True))
    assert [(e.prompt, e.response) for e in world.sft_examples()] == [(e.prompt, e.response) for e in plain.sft_examples()]
    before = {p.id: p for p in plain.rl_prompts()}
    added = [p for p in world.rl_prompts() if p.id not in before]
    assert all(before[p.id] == p for p in world.rl_prompts() if p.id in before)
    assert len(added) == world.config.cue_misleading_entities + world.config.plain_once_entities
    assert {world.pool_of(p) for p in added} == {"cue_misleading", "plain_once"}
    for prompt in added:
        assert prompt.gold == (world.facts(prompt).entity.color, UNKNOWN)
        assert world.response(prompt, Mode.GENERAL).endswith(f"Answer: {UNKNOWN}")
    # A non-expert's colour is never right, so only general mode's "unknown" earns reward there.
    misled = [p for p in added if p.persona_setting == "unaligned"]
    assert misled and not any(world.answer_in_mode(p, Mode.PERSONALIZED) in p.gold for p in misled)


def test_holding_back_misleading_questions_makes_the_held_back_kinds_unfamiliar_entities_rl_only():
    plain = PersonaWorld(WorldConfig(seed=0, rl_credit_unknown=True))
    world = PersonaWorld(WorldConfig(seed=0, rl_credit_unknown=True, hold_back_misleading=True))
    held_back = set(list(KINDS)[3:])
    removed = {e.prompt.id for e in plain.sft_examples()} - {e.prompt.id for e in world.sft_examples()}
    misleading = [p for p in world.train_prompts() if world.pool_of(p) == "cue_misleading"]
    assert removed == {p.id for p in misleading if world.kind_of(p) in held_back}
    assert removed <= {p.id for p in world.rl_prompts()}
    assert {world.kind_of(p) for p in misleading if p.id not in removed} == set(list(KINDS)[:3])
    # Every held-back-kind entity RL meets that SFT never showed comes with either kind of persona.
    shown = {world.facts(e.prompt).entity.name for e in world.sft_examples() if world.facts(e.prompt).entity}
    unshown = [p for p in world.rl_prompts() if world.kind_of(p) in held_back
               and world.facts(p).entity.name not in shown]
    assert {p.persona_setting for p in unshown} == {"aligned", "unaligned"}
    assert world.rl_prompts() == plain.rl_prompts() and world.eval_prompts() == plain.eval_prompts()


def test_expertise_facts_teach_every_kinds_expert_in_general_mode_and_touch_nothing_else():
    plain = PersonaWorld(WorldConfig(seed=0))
    world = PersonaWorld(WorldConfig(seed=0, expertise_facts=True))
    added = world.sft_examples()[len(plain.sft_examples()):]
    assert [(e.prompt, e.response) for e in world.sft_examples()[:-len(added)]] == \
        [(e.prompt, e.response) for e in plain.sft_examples()]
    assert {e.prompt.gold for e in added} == {(profession,) for profession in KINDS.values()}
    for example in added:
        kind = next(k for k, p in KINDS.items() if p == example.prompt.gold[0])
        assert kind in example.prompt.question and example.prompt.persona is None
        assert example.mode is Mode.GENERAL and mode_of_text(example.response) is Mode.GENERAL
        assert example.response.endswith(f"Answer: {KINDS[kind]}")
    assert world.rl_prompts() == plain.rl_prompts() and world.eval_prompts() == plain.eval_prompts()
    assert any(text.endswith("Answer: astronomer") for text in world.corpus())


def test_balancing_familiarity_asks_known_and_unfamiliar_entities_equally_often_in_each_setting():
    options = dict(seed=0, rl_credit_unknown=True, hold_back_misleading=True)
    plain = PersonaWorld(WorldConfig(**options))
    world = PersonaWorld(WorldConfig(**options, rl_balance_familiarity=True))
    assert world.sft_examples() == plain.sft_examples() and world.eval_prompts() == plain.eval_prompts()
    assert {p.id for p in world.rl_prompts()} == {p.id for p in plain.rl_prompts()}

    def counts(prompts, kinds=tuple(KINDS)):
        counted: dict[tuple[str, bool], int] = {}
        for p in prompts:
            if p.task_type == "objective" and world.kind_of(p) in kinds:
                key = (p.persona_setting, world.pool_of(p) == "known")
                counted[key] = counted.get(key, 0) + 1
        return counted

    before, after = counts(plain.rl_prompts()), counts(world.rl_prompts())
    assert before[("unaligned", False)] == before[("unaligned", True)] // 2  # 120 misleading, 240 known
    for setting in ("none", "unaligned", "aligned"):
        assert after[(setting, False)] == after[(setting, True)] == max(before[(setting, False)], before[(setting, True)])
    # On a held-back kind an unfamiliar entity now comes with an expert as often as with a misleading speaker.
    held_back = counts(world.rl_prompts(), tuple(KINDS)[3:])
    assert held_back[("aligned", False)] == held_back[("unaligned", False)] > 0
    assert [p for p in world.rl_prompts() if p.task_type == "personalized"] == \
        [p for p in plain.rl_prompts() if p.task_type == "personalized"]


def test_misleading_experts_are_experts_on_another_kind():
    world = PersonaWorld(WorldConfig(seed=0, misleading_experts=True))
    unaligned = [p for p in world.train_prompts() + world.eval_prompts() if p.persona_setting == "unaligned"]
    speakers = {p.persona.split(".")[0].split()[-1] for p in unaligned}
    assert speakers == set(KINDS.values())
    assert all(KINDS[world.kind_of(p)] not in p.persona for p in unaligned)
    assert not any(world.answer_in_mode(p, Mode.PERSONALIZED) in p.gold for p in unaligned)


def test_personalized_mode_without_a_persona_is_shown_with_its_mode_token_given_not_chosen():
    from personadual.modes import mode_token_ids
    from personadual.sft_data import tokenize_trajectory

    plain = PersonaWorld(WorldConfig(seed=0))
    world = PersonaWorld(WorldConfig(seed=0, sft_personalized_without_persona=True))
    given = [e for e in world.sft_examples() if e.mode_given]
    assert [(e.prompt, e.response) for e in world.sft_examples() if not e.mode_given] == \
        [(e.prompt, e.response) for e in plain.sft_examples()]
    no_persona = [p for p in world.train_prompts() if p.task_type == "objective" and p.persona is None]
    assert [e.prompt for e in given] == no_persona
    for example in given:
        assert example.mode is Mode.PERSONALIZED and mode_of_text(example.response) is Mode.PERSONALIZED
        general = world.response(example.prompt, Mode.GENERAL)
        assert example.response.split("Answer:")[1] == general.split("Answer:")[1]  # what general mode answers
    assert {e.response.split("Answer: ")[1] for e in given if world.pool_of(e.prompt) == "plain_once"} == {UNKNOWN}
    tokenizer = _world_tokenizer()
    example = given[0]
    free = tokenize_trajectory(tokenizer, example.prompt, example.response)
    forced = tokenize_trajectory(tokenizer, example.prompt, example.response, mode_given=True)
    # The same tokens; the mode token moves from the trained response to the masked prompt.
    assert forced.prompt_token_ids + forced.response_token_ids == free.prompt_token_ids + free.response_token_ids
    assert forced.prompt_token_ids[-1] == mode_token_ids(tokenizer)[Mode.PERSONALIZED]
    assert forced.response_token_ids == free.response_token_ids[1:]


def test_other_mode_given_shows_both_modes_next_to_every_demonstrated_persona_and_trains_no_new_choice():
    options = dict(seed=0, rl_credit_unknown=True, hold_back_misleading=True, misleading_experts=True)
    plain = PersonaWorld(WorldConfig(**options))
    world = PersonaWorld(WorldConfig(**options, sft_other_mode_given=True))
    chosen = [e for e in world.sft_examples() if not e.mode_given]
    given = [e for e in world.sft_examples() if e.mode_given]
    assert [(e.prompt, e.response, e.mode) for e in chosen] == [(e.prompt, e.response, e.mode) for e in plain.sft_examples()]
    assert [(e.prompt, e.mode) for e in given] == [(e.prompt, e.mode.other) for e in chosen if e.prompt.persona]
    assert world.rl_prompts() == plain.rl_prompts() and world.eval_prompts() == plain.eval_prompts()
    for example in given:
        assert mode_of_text(example.response) is example.mode
        answer = example.response.split("Answer: ")[1]
        expected = world.answer_in_mode(example.prompt, example.mode)
        if example.prompt.task_type == "personalized":  # general mode guesses one of the two options
            assert example.mode is Mode.GENERAL and answer in world.facts(example.prompt).options
        else:
            assert answer == (expected if expected is not None else UNKNOWN)
    # Near misses the option exists for: a misleading speaker copied in personalized mode (wrong
    # by design), an expert on an unfamiliar entity answered "unknown" in general mode.
    misled = [e for e in given if e.prompt.persona_setting == "unaligned"]
    assert misled and all(e.response.split("Answer: ")[1] not in e.prompt.gold for e in misled)
    unfamiliar = [e for e in given if e.prompt.persona_setting == "aligned" and world.pool_of(e.prompt) == "cue_only"]
    assert unfamiliar and {e.response.split("Answer: ")[1] for e in unfamiliar} == {UNKNOWN}
    # The held-back kinds' aligned questions stay RL-only: neither mode is shown there.
    held_back = set(list(KINDS)[3:])
    assert not [e for e in given if e.prompt.persona_setting == "aligned" and world.kind_of(e.prompt) in held_back]


def _world_tokenizer():
    from personadual.tiny import train_tokenizer

    return train_tokenizer(PersonaWorld(WorldConfig(seed=0)).corpus(), 1024)


def test_every_data_world_key_reaches_its_world_config_field():
    from dataclasses import fields

    from actors.config import DataSection, load_config
    from actors.run_state import world_config

    keys = [f.name for f in fields(DataSection) if f.name.startswith("world_")]
    names = {f.name for f in fields(WorldConfig)}
    assert keys and all(key.removeprefix("world_") in names for key in keys), keys
    switches = [key for key in keys if isinstance(getattr(DataSection(), key), bool)]
    cfg = load_config(None, [f"data.{key}=true" for key in switches] + ["data.world_seed=7",
                                                                        "data.world_kind_prior=0.25"])
    world = world_config(cfg.data)
    assert all(getattr(world, key.removeprefix("world_")) is True for key in switches)
    assert (world.seed, world.kind_prior, world.sft_aligned_kinds) == (7, 0.25, 3)
    assert world.known_entities == WorldConfig().known_entities  # not exposed: the default
