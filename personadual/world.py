"""The synthetic persona world: a small, seeded universe where a persona can help or mislead.

Objective questions ask the colour of made-up entities of a few kinds (flowers, birds,
stones, ...). A persona names the user's profession and states a colour for the entity:
- aligned: the profession is the expert one for that kind and the stated colour is right;
- unaligned: the profession belongs to another kind and the stated colour is wrong;
- none: no persona.
So the model can tell a helpful persona from a misleading one (is the speaker an expert on
this kind?), and the best policy is personalized mode for aligned personas, general mode
for unaligned ones. Personalized questions ask which of two options suits the user; only
the persona's stated preference decides, so personalized mode is the best policy there.

Entities come in four pools (docs/ARCHITECTURE.md, "The synthetic persona world": aligned
examples teach the fact they carry):
- known: asked with and without personas in training, so their facts are learnable;
- cue_only: asked once, with an aligned persona, to teach reading the persona;
- cue_misleading: asked once, with an unaligned persona. Without them every unfamiliar
  entity in training came with a right persona, and the model learned "unfamiliar entity:
  trust the persona" instead of "expert speaker: trust the persona" (measured: unaligned
  personas on unseen entities chose personalized mode 19 times in 24 after DualGRPO);
- plain_once: asked once, without a persona, answered "unknown" in general mode. Without
  them general mode had only ever said "unknown" next to a persona; asked plainly about an
  unfamiliar entity it guessed a colour, and the lucky guesses moved no-persona accuracy
  (measured: +0.055 over unaligned, from 4 guesses in 24 once SFT saw fewer cue entities);
- unseen: appear only in evaluation, so only an aligned persona can supply their colour.
SFT demonstrations and RL prompts differ, as in the paper, where SFT teaches the two modes
and DualGRPO improves the choice between them: only the first ``sft_aligned_kinds`` kinds'
aligned-persona questions (known and cue_only entities) have SFT demonstrations; the other
kinds' experts appear in SFT only as unaligned speakers about other kinds, and their aligned
questions are RL prompts only. Measured, seed 0:
- every kind demonstrated: SFT already reached the either-mode upper bound in every setting
  and RL had nothing left to win;
- only cue_only entities held back (their kinds' known entities still demonstrated with
  aligned personas): SFT generalised "expert speaker: personalized mode" to the held-back
  kinds at once, and RL's gains came from chance SFT slips instead;
- three kinds of six, as here: SFT answers aligned questions of the other three kinds in
  general mode (personalized-mode rate on aligned eval prompts 0.5), which RL with forced
  prefixes is there to correct.
RL prompts leave out the questions no mode can answer (cue_misleading, plain_once): their
groups reward only lucky guesses, which teaches guessing instead of "unknown".
General mode knows the known entities' colours only; asked about any other entity it says
it does not know (answer "unknown") rather than guessing, so accuracy without a usable
persona is the same in every setting instead of varying with random guesses (measured: the
guesses on 24 unseen entities alone moved the no-persona vs unaligned gap by +-0.03).
Evaluation asks known and unseen entities with a question template that training never
uses, and preference questions with a held-out template, so no eval prompt is a train prompt.

Options against the shortcuts RL found (WorldConfig, personadual/world_config.py; all off in
WorldConfig, all but sft_other_mode_given on in configs/default.yaml; measured in
docs/EXPERIMENTS.md, "World options against the shortcuts", and the README's "The default
run, measured"):
- rl_credit_unknown: RL also asks the questions no mode can answer, "unknown" scored right,
  so trusting a non-expert about an unfamiliar entity costs reward;
- hold_back_misleading: with it, the held-back kinds' cue_misleading questions are RL-only like
  their aligned ones; otherwise every held-back-kind entity that RL meets and SFT never showed
  comes with an expert, and RL learned "a held-back kind's entity SFT never showed: trust the
  persona" (seed 0: unaligned fish questions 0.76 in personalized mode after RL);
- expertise_facts: SFT answers "who knows the color of a fish?" for every kind, so the
  held-back kinds' experts are known before RL, as a pretrained model knows them; without it
  RL had to learn three profession-kind pairs from the reward alone, and in 40-200 steps it
  learned none of them once the shortcuts were gone;
- misleading_experts: every unaligned persona is another kind's expert, so a profession says
  nothing by itself and only "expert on this kind" separates the settings;
- sft_personalized_without_persona: personalized mode's answer without a persona is shown
  (its mode token given, not trained); otherwise it guesses a colour there, and its lucky
  guesses lifted no persona's either-mode upper bound 0.02-0.10 above its accuracy.
- sft_other_mode_given: SFT shows the other mode's answer to each demonstrated question with
  a persona, its mode token given, so both modes' content is taught next to either kind of
  persona; otherwise RL let the unshown mode drift towards the shown one's answers (seed 2:
  general mode copying the expert), and with both modes earning the same reward the mode
  token learned nothing;
- rl_balance_familiarity: within each persona setting RL asks about known and unfamiliar
  entities equally often; otherwise unfamiliar entities came with an expert twice as often as
  with a misleading speaker, and RL learned "unfamiliar entity of a held-back kind: trust the
  persona" (seed 0 with the five options above: 13 of 25 unaligned questions about unseen
  fish in personalized mode after 400 steps).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Iterator

from personadual.modes import Mode
from personadual.prompts import format_response
from personadual.records import Prompt
from personadual.world_config import (  # noqa: F401 (re-exported: the world's public names)
    COLORS, EVAL_OBJECTIVE_TEMPLATE, EVAL_PREFERENCE_TEMPLATE, EXPERTISE_TEMPLATES, KINDS, ONCE_SEEN_SETTING,
    PREFERENCES, PROFESSIONS, SETTINGS, SYLLABLES, TRAIN_OBJECTIVE_TEMPLATES, TRAIN_PREFERENCE_TEMPLATES,
    TYPICAL_COLORS, UNKNOWN, WorldConfig,
)


def _article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


@dataclass(frozen=True)
class Entity:
    name: str
    kind: str
    color: str
    pool: str  # known | cue_only | cue_misleading | unseen


@dataclass(frozen=True)
class WorldFacts:
    """What the world knows about one prompt: the entity or preference it asks about."""

    entity: Entity | None
    persona_color: str | None  # colour the persona states (objective prompts)
    preferred: str | None  # option the persona prefers (personalized prompts)
    options: tuple[str, str] | None


@dataclass(frozen=True)
class SftExample:
    prompt: Prompt
    response: str
    mode: Mode
    mode_given: bool = False  # the mode token is a given prefix, not a trained choice (personadual/sft_data.py)


class PersonaWorld:
    """Deterministic from ``config.seed``: the same config gives the same prompts."""

    def __init__(self, config: WorldConfig = WorldConfig()) -> None:
        self.config = config
        rng = random.Random(config.seed)
        self.entities = self._make_entities(rng)
        self._facts: dict[str, WorldFacts] = {}
        self._train = self._objective_train(rng) + self._preferences(
            rng, TRAIN_PREFERENCE_TEMPLATES, config.preference_train_prompts, "train")
        self._eval = self._objective_eval(rng, self.entities) + self._preferences(
            rng, (EVAL_PREFERENCE_TEMPLATE,), config.preference_eval_prompts, "eval")
        eval_rng = random.Random(f"{config.seed}/eval_only")
        extra = self._eval_only_entities(eval_rng)
        self.entities += extra
        self._eval += self._objective_eval(eval_rng, extra)
        self._expertise = self._expertise_prompts() if config.expertise_facts else []

    # ---- construction -------------------------------------------------------------------
    def _make_entities(self, rng: random.Random) -> list[Entity]:
        cfg = self.config
        pools = ["known"] * cfg.known_entities + ["cue_only"] * cfg.cue_only_entities + \
            ["cue_misleading"] * cfg.cue_misleading_entities + ["unseen"] * cfg.unseen_entities + \
            ["plain_once"] * cfg.plain_once_entities
        return self._named_entities(rng, pools, set(), self.config.kind_prior)

    def _eval_only_entities(self, rng: random.Random) -> list[Entity]:
        taken = {entity.name for entity in self.entities}
        return self._named_entities(rng, ["unseen"] * self.config.eval_only_entities, taken, self.config.kind_prior)

    @staticmethod
    def _named_entities(rng: random.Random, pools: list[str], names: set[str], kind_prior: float) -> list[Entity]:
        """One entity per pool entry, kinds in turn, each name new and no name inside another
        (``names``: those already taken, updated)."""
        entities = []
        kinds = list(KINDS)
        for index, pool in enumerate(pools):
            while True:
                name = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
                # No name inside another: each entity must be told apart by its whole name.
                if not any(name.lower() in other.lower() or other.lower() in name.lower() for other in names):
                    names.add(name)
                    break
            kind = kinds[index % len(kinds)]
            if kind_prior > 0:
                typical = TYPICAL_COLORS[kind]
                color = typical if rng.random() < kind_prior else rng.choice([c for c in COLORS if c != typical])
            else:
                color = rng.choice(COLORS)
            entities.append(Entity(name, kind, color, pool))
        return entities

    def _persona(self, rng: random.Random, entity: Entity, setting: str) -> tuple[str, str]:
        """Persona text and the colour it states."""
        if setting == "aligned":
            profession, color = KINDS[entity.kind], entity.color
        else:
            speakers = KINDS.values() if self.config.misleading_experts else PROFESSIONS
            profession = rng.choice([p for p in speakers if p != KINDS[entity.kind]])
            color = rng.choice([c for c in COLORS if c != entity.color])
        # Identical wording in both settings: only the profession tells them apart.
        return f"I am {_article(profession)}. I know the {entity.kind} {entity.name} is {color}.", color

    def _objective(self, rng: random.Random, entity: Entity, template: str, setting: str,
                   split: str, template_index: int) -> Prompt:
        persona, persona_color = self._persona(rng, entity, setting) if setting != "none" else (None, None)
        prompt = Prompt(
            id=f"{split}-obj-{entity.name}-t{template_index}-{setting}",
            question=template.format(kind=entity.kind, name=entity.name),
            persona=persona, persona_setting=setting, task_type="objective",
            gold=(entity.color,), scorer="exact_match", benchmark="synthetic",
        )
        self._facts[prompt.id] = WorldFacts(entity, persona_color, None, None)
        return prompt

    def _objective_train(self, rng: random.Random) -> list[Prompt]:
        prompts = []
        for entity in self.entities:
            if entity.pool == "known":
                for t, template in enumerate(TRAIN_OBJECTIVE_TEMPLATES):
                    for setting in SETTINGS:
                        prompts.append(self._objective(rng, entity, template, setting, "train", t))
            elif entity.pool in ONCE_SEEN_SETTING:
                # Asked once: many entities seen once teach reading the persona, where a few
                # entities seen often are simply memorised (measured on the tiny model).
                t = rng.randrange(len(TRAIN_OBJECTIVE_TEMPLATES))
                prompts.append(self._objective(rng, entity, TRAIN_OBJECTIVE_TEMPLATES[t],
                                               ONCE_SEEN_SETTING[entity.pool], "train", t))
        return prompts

    def _objective_eval(self, rng: random.Random, entities: list[Entity]) -> list[Prompt]:
        return [self._objective(rng, entity, EVAL_OBJECTIVE_TEMPLATE, setting, "eval", 9)
                for entity in entities if entity.pool in ("known", "unseen")
                for setting in SETTINGS]

    @staticmethod
    def _expertise_prompts() -> list[Prompt]:
        return [Prompt(id=f"train-expert-{kind}-t{t}", question=template.format(kind=kind), persona=None,
                       persona_setting="none", task_type="objective", gold=(profession,),
                       scorer="exact_match", benchmark="synthetic")
                for kind, profession in KINDS.items() for t, template in enumerate(EXPERTISE_TEMPLATES)]

    @staticmethod
    def _expertise_example(prompt: Prompt) -> SftExample:
        profession = prompt.gold[0]
        kind = next(k for k, p in KINDS.items() if p == profession)
        reasoning = f"{_article(profession).capitalize()} knows the {kind}s."
        return SftExample(prompt, format_response(Mode.GENERAL, reasoning, profession), Mode.GENERAL)

    def _preferences(self, rng: random.Random, templates: tuple[str, ...], count: int,
                     split: str) -> list[Prompt]:
        prompts = []
        for index in range(count):
            category = rng.choice(sorted(PREFERENCES))
            a, b = rng.sample(PREFERENCES[category], 2)
            preferred = rng.choice((a, b))
            profession = rng.choice(PROFESSIONS)
            prompt = Prompt(
                id=f"{split}-pref-{index}",
                question=rng.choice(templates).format(category=category, a=a, b=b),
                persona=f"I am {_article(profession)}. I love {preferred}.",
                persona_setting="aligned", task_type="personalized",
                gold=(preferred,), scorer="exact_match", benchmark="synthetic",
            )
            self._facts[prompt.id] = WorldFacts(None, None, preferred, (a, b))
            prompts.append(prompt)
        return prompts

    # ---- queries ------------------------------------------------------------------------
    def train_prompts(self) -> list[Prompt]:
        """Every training question: the SFT demonstrations' prompts and the RL prompts."""
        return list(self._train)

    def rl_prompts(self) -> list[Prompt]:
        """The training questions some mode can answer (see the module docstring); with
        ``rl_credit_unknown`` also those none can, with "unknown" added to their gold."""
        prompts = []
        for prompt in self._train:
            answer = self.answer_in_mode(prompt, self.best_mode(prompt))
            if answer in prompt.gold:
                prompts.append(prompt)
            elif answer is None and self.config.rl_credit_unknown:
                prompts.append(replace(prompt, gold=(*prompt.gold, UNKNOWN)))
        return self._balanced_by_familiarity(prompts) if self.config.rl_balance_familiarity else prompts

    def _balanced_by_familiarity(self, prompts: list[Prompt]) -> list[Prompt]:
        """Each objective setting's known-entity and once-seen-entity questions cycled up to
        the larger of the two, in their order; preference questions as they are."""
        groups: dict[tuple[str, str, bool], list[Prompt]] = {}
        for prompt in prompts:
            familiar = self.pool_of(prompt) == "known"
            groups.setdefault((prompt.task_type, prompt.persona_setting, familiar), []).append(prompt)
        balanced = []
        for (task_type, setting, familiar), group in groups.items():
            other = groups.get((task_type, setting, not familiar), [])
            target = max(len(group), len(other)) if task_type == "objective" else len(group)
            balanced += [group[i % len(group)] for i in range(target)]
        return balanced

    def has_sft_demonstration(self, prompt: Prompt) -> bool:
        entity = self.facts(prompt).entity
        kinds = self.config.sft_aligned_kinds
        if entity is None or kinds is None or entity.kind in list(KINDS)[:kinds]:
            return True
        if prompt.persona_setting == "aligned":
            return False
        return not (self.config.hold_back_misleading and entity.pool == "cue_misleading")

    def eval_prompts(self) -> list[Prompt]:
        return list(self._eval)

    def facts(self, prompt: Prompt) -> WorldFacts:
        return self._facts[prompt.id]

    def kind_of(self, prompt: Prompt) -> str:
        """The entity kind an objective prompt asks about; "preference" for the others."""
        entity = self.facts(prompt).entity
        return entity.kind if entity is not None else "preference"

    def pool_of(self, prompt: Prompt) -> str:
        """The entity's pool (known, unseen, ...); "preference" for personalized prompts."""
        entity = self.facts(prompt).entity
        return entity.pool if entity is not None else "preference"

    def is_knowable(self, prompt: Prompt) -> bool:
        """Whether general mode can know the answer: the entity's colour is stated in
        general-mode training text (known entities; the others appear once at most, told by
        a persona)."""
        facts = self.facts(prompt)
        return facts.entity is not None and facts.entity.pool == "known"

    def answer_in_mode(self, prompt: Prompt, mode: Mode) -> str | None:
        """What an ideal model answers in ``mode``; None where that mode cannot know."""
        facts = self.facts(prompt)
        if facts.entity is not None:
            if mode is Mode.PERSONALIZED and facts.persona_color is not None:
                return facts.persona_color
            if self.is_knowable(prompt):
                return facts.entity.color
            return TYPICAL_COLORS[facts.entity.kind] if self.config.kind_prior > 0 else None
        return facts.preferred if mode is Mode.PERSONALIZED else None

    def best_mode(self, prompt: Prompt) -> Mode:
        """The mode a perfect policy picks (the labels the world is designed around)."""
        if prompt.task_type == "personalized" or prompt.persona_setting == "aligned":
            return Mode.PERSONALIZED
        return Mode.GENERAL

    def response(self, prompt: Prompt, mode: Mode, rng: random.Random | None = None) -> str:
        """A trajectory in ``mode``. Where the mode cannot know, an objective answer is
        "unknown" (or, with ``kind_prior``, the kind's typical colour); a preference is
        guessed (seeded by rng)."""
        facts = self.facts(prompt)
        answer = self.answer_in_mode(prompt, mode)
        if facts.entity is not None:
            entity = facts.entity
            if answer is None:
                return format_response(mode, f"I do not know the {entity.kind} {entity.name}.", UNKNOWN)
            if mode is Mode.PERSONALIZED and facts.persona_color is not None:
                reasoning = f"You said the {entity.kind} {entity.name} is {answer}."
            elif not self.is_knowable(prompt):  # the kind's typical colour (kind_prior > 0)
                reasoning = f"I do not know the {entity.kind} {entity.name}; most {entity.kind}s are {answer}."
            else:
                reasoning = f"The {entity.kind} {entity.name} is {answer}."
        else:
            assert facts.options is not None
            if answer is None:
                answer = (rng or random.Random(prompt.id)).choice(facts.options)
                reasoning = "Both are good choices."
            else:
                reasoning = f"You love {answer}."
        return format_response(mode, reasoning, answer)

    def sft_examples(self) -> list[SftExample]:
        """Gain-based SFT data (paper appendix B.1): personalized tasks get personalized-mode
        trajectories; objective tasks get one only where the persona yields the right answer,
        else a general-mode one. Only the prompts ``has_sft_demonstration`` admits."""
        examples = []
        for prompt in filter(self.has_sft_demonstration, self._train):
            if prompt.task_type == "personalized":
                mode = Mode.PERSONALIZED
            else:
                persona_right = self.answer_in_mode(prompt, Mode.PERSONALIZED) in prompt.gold \
                    and prompt.persona is not None
                mode = Mode.PERSONALIZED if persona_right else Mode.GENERAL
            examples.append(SftExample(prompt, self.response(prompt, mode), mode))
        # Every question without a persona is demonstrated in general mode, so its other mode
        # is sft_personalized_without_persona's personalized answer.
        given = ([e for e in examples if e.prompt.persona is not None] if self.config.sft_other_mode_given else []) \
            + ([e for e in examples if e.prompt.persona is None] if self.config.sft_personalized_without_persona else [])
        return examples + [self._other_mode_given(e) for e in given] \
            + [self._expertise_example(prompt) for prompt in self._expertise]

    def _other_mode_given(self, example: SftExample) -> SftExample:
        """The other mode's answer to ``example``'s question, its mode token given, not trained."""
        mode = example.mode.other
        return SftExample(example.prompt, self.response(example.prompt, mode), mode, mode_given=True)

    def corpus(self) -> Iterator[str]:
        """Every text the world can produce, for training the tiny model's tokenizer."""
        for prompt in self._train + self._eval:
            if prompt.persona:
                yield prompt.persona
            yield prompt.question
            for mode in Mode:
                yield self.response(prompt, mode)
        for prompt in self._expertise:
            yield prompt.question
            yield self._expertise_example(prompt).response
