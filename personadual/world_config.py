"""The persona world's vocabulary (kinds and their experts, colours, phrasings) and its options.

``personadual/world.py`` builds the world from these; its docstring says why each pool and
option exists.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS: dict[str, str] = {  # kind -> the profession that is expert on it
    "flower": "gardener",
    "bird": "birdwatcher",
    "stone": "geologist",
    "fish": "fisher",
    "star": "astronomer",
    "moth": "entomologist",
}
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")
SYLLABLES = ("zor", "vath", "kel", "mi", "dra", "nu", "pel", "tor", "ash", "qui", "bel", "rho",
             "sen", "lo", "gar", "fen", "ul", "tix", "mor", "vey", "zan", "pri", "os", "lek")
# Five phrasings: with three, the tiny model answered the held-out eval phrasing less
# robustly (it copied a misleading persona's colour on 4% of known entities, against 0.3%
# on the training phrasings).
TRAIN_OBJECTIVE_TEMPLATES = (
    "What color is the {kind} {name}?",
    "Tell me the color of the {kind} {name}.",
    "Which color does the {kind} {name} have?",
    "Do you know the color of the {kind} {name}?",
    "I wonder what color the {kind} {name} is.",
)
EVAL_OBJECTIVE_TEMPLATE = "What is the color of the {kind} {name}?"
PREFERENCES: dict[str, tuple[str, ...]] = {
    "drink": ("tea", "coffee", "juice", "milk"),
    "sport": ("tennis", "soccer", "chess", "golf"),
    "pet": ("cat", "dog", "parrot", "rabbit"),
    "meal": ("soup", "pasta", "salad", "curry"),
    "trip": ("beach", "mountains", "city", "forest"),
    "music": ("jazz", "rock", "opera", "folk"),
}
# Six phrasings, some worded like the objective questions ("What ... is ..."): with two, the
# held-out eval phrasing ("For me, which ... is better") was read as an objective question
# at some seeds (the SFT checkpoint answered 0.146 of the eval preferences, "You said the
# flower X is black"), although the training preferences were fitted (loss 0.007).
TRAIN_PREFERENCE_TEMPLATES = (
    "Which {category} should I pick, {a} or {b}?",
    "Recommend a {category} for me: {a} or {b}?",
    "Between {a} and {b}, which {category} would suit me?",
    "I need a {category}. Should I choose {a} or {b}?",
    "What {category} is right for me, {a} or {b}?",
    "Help me decide on a {category}: {a} or {b}?",
)
EVAL_PREFERENCE_TEMPLATE = "For me, which {category} is better, {a} or {b}?"
# With WorldConfig.expertise_facts: general-mode questions about who knows each kind, for every
# kind, so the model knows "a fisher knows fish" before RL, as a pretrained model knows which
# professions know what; only the mode choice on the held-back kinds is left to RL.
EXPERTISE_TEMPLATES = (
    "Who knows the color of a {kind}?",
    "Which profession knows {kind}s best?",
    "Whom should I ask about the color of a {kind}?",
)
PROFESSIONS = tuple(KINDS.values()) + ("baker", "pilot", "teacher", "nurse")
SETTINGS = ("none", "unaligned", "aligned")
UNKNOWN = "unknown"  # general mode's answer about an entity whose colour it never learned
# With WorldConfig.kind_prior > 0, most entities of a kind share its typical colour, and general
# mode answers it for an entity it never learned: common knowledge that is often, not always, right.
TYPICAL_COLORS = {"flower": "red", "bird": "blue", "stone": "black", "fish": "green", "star": "yellow",
                  "moth": "white"}
ONCE_SEEN_SETTING = {"cue_only": "aligned", "cue_misleading": "unaligned", "plain_once": "none"}


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    known_entities: int = 48
    cue_only_entities: int = 240
    cue_misleading_entities: int = 120
    plain_once_entities: int = 48
    unseen_entities: int = 24
    # More unseen entities for evaluation only, drawn from their own generator after the rest
    # of the world, so the training data (and the tiny model's tokenizer) does not depend on
    # how large the eval set is. 48 known + 24 + 128 unseen: 200 eval items per objective
    # setting, so one item moves a setting's accuracy by 0.5%.
    eval_only_entities: int = 128
    sft_aligned_kinds: int | None = 3  # kinds whose aligned-persona questions get SFT demonstrations; None: all
    # Share of each kind's entities in its typical colour (TYPICAL_COLORS), which general mode
    # answers for entities it never learned; 0: colours uniform, general mode says "unknown".
    # With a prior, an unaligned persona on an unfamiliar entity is a question general mode
    # can win (RL asks them), so "unfamiliar entity: trust the persona" stops paying.
    kind_prior: float = 0.0
    # RL also asks the training questions no mode can answer from the prompt (cue_misleading:
    # a non-expert persona on an unfamiliar entity; plain_once: no persona), scoring "unknown",
    # the answer SFT demonstrates for them, as right. Without them no RL prompt ever makes
    # trusting a non-expert about an unfamiliar entity cost reward; False: left out.
    rl_credit_unknown: bool = False
    # The held-back kinds' cue_misleading questions (a non-expert on an unfamiliar entity) are
    # RL prompts only, like their aligned ones. Otherwise every held-back-kind entity RL meets
    # unfamiliar comes with an expert, and RL learns "unfamiliar entity of a held-back kind:
    # trust the persona" instead of "the expert of this kind: trust the persona". Takes effect
    # with rl_credit_unknown (without it those questions are not RL prompts either).
    hold_back_misleading: bool = False
    expertise_facts: bool = False  # SFT also answers EXPERTISE_TEMPLATES (general mode)
    # Unaligned personas are experts on another kind ("I am a fisher. I know the bird X is
    # red."), never a baker or a pilot, so every expert speaks both where it is right and where it
    # misleads and only "expert on this kind" tells the settings apart.
    misleading_experts: bool = False
    # SFT also shows personalized mode's answer to the no-persona questions, its mode token given
    # rather than trained (so the mode choice stays the gain-based one): with no persona to
    # read, personalized mode answers from knowledge ("unknown" for an unfamiliar entity).
    # Without them personalized mode never met a question without a persona, guessed a colour
    # there, and its lucky guesses put no persona's either-mode upper bound 0.02-0.10 above it.
    sft_personalized_without_persona: bool = False
    # RL asks, within each persona setting, about entities SFT taught (known) and entities it
    # did not (once seen) equally often, the rarer repeated. Otherwise an unfamiliar entity
    # came with an expert twice as often as with a misleading speaker (240 cue_only against
    # 120 cue_misleading), and RL learned "unfamiliar entity of a held-back kind: trust the
    # persona" before "the expert on this kind: trust the persona". Takes effect on the
    # questions rl_credit_unknown adds (without it RL asks no unfamiliar unaligned question).
    rl_balance_familiarity: bool = False
    # SFT also shows the other mode's answer to every demonstrated question with a persona
    # (general mode's "unknown" next to an expert on an unfamiliar entity, its guess on a
    # preference; personalized mode's copy of a misleading speaker), its mode token given, not
    # trained, so each mode's content is taught on both kinds of persona and only the choice is
    # left to RL. Without them the forced samples of the mode SFT never showed after a persona
    # were free to drift: at seed 2 general mode came to copy the expert (aligned questions
    # about unseen entities 0.16 after SFT, 0.47 after RL) and to read preferences (0.45, 0.99),
    # and where both modes earn the same reward the mode token gets no advantage.
    sft_other_mode_given: bool = False
    preference_train_prompts: int = 240
    preference_eval_prompts: int = 150
