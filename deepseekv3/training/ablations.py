"""The alignment ablations at equal compute: which stages a model trains through, for how many optimizer steps.

Every variant takes the same total number of optimizer steps of the same batch size from the same initial weights,
so a difference between two variants is what their stages do, not how long they train:

- `A` (the seed's recipe): contrastive (`s1` steps) -> attention distillation (`s2`) -> instruction tuning (`s3`).
- `B` (instruction tuning only): `s1 + s2 + s3` steps of stage 3. It sees every supervised question-answer example
  A sees (A's stage 2 also trains on every answer: the distillation collator keeps the reply labels) and more:
  its stage-1 steps are question answering too. The strongest baseline of the four at equal steps.
- `C` (A without stage 1): distillation for `s1 + s2` steps, then stage 3.
- `D` (A without distillation): A's schedule with `attention_distillation_weight=0` in stage 2: the same batches, the
  same answer labels, the same steps, no distillation term. A - D isolates attention distillation, the seed's claim.

Each step of a schedule is a `build_stage_trainer` recipe (`deepseekv3.training.recipes`) run for its steps with its
own cosine schedule.
"""

from collections.abc import Mapping

__all__ = ["VARIANTS", "schedule"]

VARIANTS = ("A", "B", "C", "D")


def schedule(variant: str, stage_steps: Mapping[str, int]) -> list[tuple[str, int, dict[str, float]]]:
    """The stages `variant` trains through.

    Args:
        variant (`str`): one of `VARIANTS`.
        stage_steps (`Mapping[str, int]`): A's steps per stage, keys `contrastive`, `distill` and `instruct`.

    Returns:
        `list[tuple[str, int, dict]]`: `(recipe stage, steps, config overrides during that stage)` in order; the
        steps always sum to A's.

    Raises:
        `ValueError`: an unknown variant, or `stage_steps` without the three stages or with a negative count.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant ({variant!r}) must be one of {VARIANTS}")
    missing = sorted({"contrastive", "distill", "instruct"} - set(stage_steps))
    if missing:
        raise ValueError(f"stage_steps ({dict(stage_steps)}) must give the steps of {missing}")
    s1, s2, s3 = (int(stage_steps[stage]) for stage in ("contrastive", "distill", "instruct"))
    if min(s1, s2, s3) < 0:
        raise ValueError(f"stage_steps ({dict(stage_steps)}) must be non-negative")
    stages = {
        "A": [("contrastive", s1, {}), ("distill", s2, {}), ("instruct", s3, {})],
        "B": [("instruct", s1 + s2 + s3, {})],
        "C": [("distill", s1 + s2, {}), ("instruct", s3, {})],
        "D": [("contrastive", s1, {}), ("distill", s2, {"attention_distillation_weight": 0.0}), ("instruct", s3, {})],
    }[variant]
    return [stage for stage in stages if stage[1] > 0]
