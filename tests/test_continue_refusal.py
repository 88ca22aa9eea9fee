"""The refusal to continue a started stage with other settings names the user's change first."""

from magic3d.recipe import differences_summary

LINES = [f"model.scene.k{i}: {i} -> {i + 1}" for i in range(9)] + ["trainer.max_steps: 4 -> 8"]


def test_the_overridden_key_comes_first_even_past_the_cap() -> None:
    text = differences_summary(LINES, ["trainer.max_steps=8"])
    assert text.startswith("trainer.max_steps: 4 -> 8; model.scene.k0")
    assert text.endswith("; and 2 more")  # 10 lines, 8 shown


def test_stage_prefixed_and_nested_overrides_match_their_lines() -> None:
    lines = ["model.guidance.guidance_scale: 7.5 -> 5.0", "data.batch_size: 1 -> 2"]
    assert differences_summary(lines, ["coarse:data=..."]) == "data.batch_size: 1 -> 2; model.guidance.guidance_scale: 7.5 -> 5.0"
    assert differences_summary(lines, ["model.guidance.init_args.guidance_scale=5"]).startswith("model.guidance")


def test_short_lists_are_shown_whole_in_their_order() -> None:
    assert differences_summary(LINES[:2], []) == "; ".join(LINES[:2])
