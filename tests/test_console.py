"""What a run prints: a bar on a terminal, plain lines elsewhere, and vLLM's per-sync false
alarm filtered while its other warnings pass."""

from __future__ import annotations

import io
import logging

from actors.console import StageProgress, quiet_libraries


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_without_a_terminal_each_step_is_one_plain_line():
    stream = io.StringIO()
    with StageProgress("DualGRPO", 3, stream=stream) as progress:
        for _ in range(3):
            progress.update(reward=0.25, step_s=1.5)
        progress.write("eval step_2 (RL step 2): mean acc 0.500")
    assert stream.getvalue().splitlines() == [
        "DualGRPO step 1/3 reward=0.250 step_s=1.500", "DualGRPO step 2/3 reward=0.250 step_s=1.500",
        "DualGRPO step 3/3 reward=0.250 step_s=1.500", "eval step_2 (RL step 2): mean acc 0.500"]


def test_sft_lines_come_every_tenth_step_and_at_the_last():
    stream = io.StringIO()
    with StageProgress("SFT", 25, initial=4, stream=stream, every=10) as progress:
        for _ in range(21):
            progress.update(loss=1.0)
    assert [line.split()[2] for line in stream.getvalue().splitlines()] == ["10/25", "20/25", "25/25"]


def test_on_a_terminal_a_bar_redraws_in_place():
    stream = Terminal()
    with StageProgress("SFT", 4, stream=stream) as progress:
        for _ in range(4):
            progress.update(loss=0.5)
    text = stream.getvalue()
    assert "\r" in text and "4/4" in text and "loss=0.500" in text
    assert "SFT step 1/4" not in text


def test_vllm_rotary_false_alarm_is_dropped_and_other_warnings_pass(caplog):
    quiet_libraries()
    layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    with caplog.at_level(logging.WARNING):
        layerwise.warning("%s: Failed to load weights", "RotaryEmbedding")
        layerwise.warning("%s: Failed to load weights", "QKVParallelLinear")
        logging.getLogger("vllm.v1.core.block_pool").info("Successfully reset prefix cache")
    assert [r.getMessage() for r in caplog.records] == ["QKVParallelLinear: Failed to load weights"]


def test_time_left_costs_each_stage_at_its_own_step_time_and_is_not_guessed_before():
    from personadual.step_metrics import RunClock

    clock = RunClock(sft_left=3, rl_left=2)
    first = clock.step_done("sft", 1.0)
    assert first["stage_eta_s"] == 2.0 and first["eta_s"] is None  # no RL step timed yet
    clock.step_done("sft", 1.0)
    assert clock.step_done("sft", 1.0)["eta_s"] is None
    after_rl = clock.step_done("rl", 30.0)
    assert after_rl["stage_eta_s"] == after_rl["eta_s"] == 30.0
