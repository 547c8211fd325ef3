"""pretrain_gpt.py with a DeepSpeed JSON shaped like the original Megatron-DeepSpeed / XMoE fork
template: it gets through deepspeed.initialize (DeepSpeed 0.19.8 refuses its legacy top-level
curriculum_learning section) and trains. The cross-checks of a JSON against the flags are in
tests/test_arguments.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_pretrain_gpt import (ITERATION_RE, lines_matching, model_flags, run_pretrain,
                                     tiny_data)  # noqa: F401  (tiny_data: a fixture)

# The shape of the original examples_deepspeed/MoE/ds_config_gpt_TEMPLATE.json (Megatron-DeepSpeed
# and the XMoE fork, whose scripts filled it with sed): its keys and nesting, its placeholders.
ORIGINAL_TEMPLATE = """{
  "train_batch_size" : CONFIG_BATCH_SIZE,
  "train_micro_batch_size_per_gpu": CONFIG_MBSIZE,
  "steps_per_print": LOG_INTERVAL,
  "zero_optimization": {"stage": ZERO_STAGE, "elastic_checkpoint": true},
  "gradient_clipping": 1.0,
  "prescale_gradients": PRESCALE_GRAD,
  "fp16": {"enabled": CONFIG_FP16_ENABLED, "loss_scale": 0, "loss_scale_window": 500,
           "hysteresis": 2, "min_loss_scale": 1, "initial_scale_power": 11},
  "bf16": {"enabled": CONFIG_BF16_ENABLED},
  "curriculum_learning": {"enabled": CONFIG_CL_ENABLED, "curriculum_type": "seqlen",
                          "min_difficulty": CONFIG_CL_MIN, "max_difficulty": CONFIG_CL_MAX,
                          "schedule_type": "fixed_linear",
                          "schedule_config": {"total_curriculum_step": CONFIG_CL_DURATION,
                                              "difficulty_step": 8}},
  "wall_clock_breakdown" : true
}"""


def fill_original_template(path: Path, **values: object) -> str:
    """ORIGINAL_TEMPLATE with its placeholders replaced, as the original scripts' sed did."""
    text = ORIGINAL_TEMPLATE
    for name, value in values.items():
        text = text.replace(name, str(value).lower() if isinstance(value, bool) else str(value))
    assert "CONFIG_" not in text, text
    path.write_text(text)
    return str(path)


@pytest.mark.slow
def test_original_template_config_trains(tiny_data, tmp_path):
    """pretrain_gpt.py --deepspeed --deepspeed_config with the original template's JSON (fp16 and
    bf16 sections, bf16 switched on; a switched-off curriculum_learning, which DeepSpeed 0.19.8
    refuses; prescale_gradients, wall_clock_breakdown, ZeRO's elastic_checkpoint) gets through
    deepspeed.initialize and trains; one line says the legacy section was left out."""
    config = fill_original_template(
        tmp_path / "ds_config.json", CONFIG_BATCH_SIZE=8, CONFIG_MBSIZE=4, LOG_INTERVAL=1,
        ZERO_STAGE=0, PRESCALE_GRAD=True, CONFIG_FP16_ENABLED=False, CONFIG_BF16_ENABLED=True,
        CONFIG_CL_ENABLED=False, CONFIG_CL_MIN=8, CONFIG_CL_MAX=64, CONFIG_CL_DURATION=100)
    proc = run_pretrain(model_flags(tiny_data) + [
        "--train-iters", "2", "--lr-warmup-iters", "1", "--log-interval", "1", "--bf16",
        "--deepspeed", "--deepspeed_config", config], check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    notes = [line for line in proc.stdout.splitlines() if "curriculum_learning" in line]
    assert len(notes) == 1 and "left out" in notes[0] and config in notes[0], notes
    assert [int(m["it"]) for m in lines_matching(proc.stdout, ITERATION_RE)] == [1, 2]
