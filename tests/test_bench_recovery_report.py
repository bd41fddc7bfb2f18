"""The recovery benchmark's report: seeds averaged per recipe, one verdict per recipe on the size target and one per
baseline on the equal-parameters target, hand notes as paragraphs."""

import sys

import pytest
from testing_utils import BENCHMARKS


sys.path.insert(0, str(BENCHMARKS))
import bench_recovery  # noqa: E402
import recovery_report  # noqa: E402


def _row(accuracy, params):
    measured = {"accuracy": accuracy, "params": params, "flops": params, "cpu_b1_ms": 10.0, "cpu_b32_ms": 100.0}
    return {**measured, "minutes": 5.0, "teacher_ref": {"cpu_b1_ms": 20.0, "cpu_b32_ms": 200.0}}


def _section(lines, heading):
    """The `- ` lines under the first heading that starts with `heading`, up to the next heading."""
    start = next(i for i, line in enumerate(lines) if line.startswith(heading)) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return [line for line in lines[start:end] if line.startswith("- ")]


def test_seeds_are_averaged_and_each_recipe_is_judged_against_the_target():
    rows = {"teacher": _row(0.90, 1000), "hidden_both@0": _row(0.89, 190), "hidden_both@1": _row(0.87, 190)}
    rows["dense_student@0"] = _row(0.895, 300)
    lines = recovery_report.report(rows)
    recipe = next(line for line in lines if line.startswith("| + hidden width, + hidden-state"))
    # two seeds, mean 88.00 (-2.00 points), spread = sample standard deviation of 89 and 87
    assert "| 2 | 88.00 ± 1.41 | -2.00 | 190 (81.0% fewer)" in recipe
    verdicts = _section(lines, "## Target: >= ")
    assert verdicts == [
        "- + hidden width, + hidden-state and attention KD: 81.0% fewer at -2.00 points: NOT met.",
        "- dense student (same depth and width, uniform FFN), same losses: 70.0% fewer at -0.50 points: NOT met.",
    ]
    rows["hidden_both@1"] = _row(0.895, 190)
    assert _section(recovery_report.report(rows), "## Target: >= ")[0].endswith("81.0% fewer at -0.75 points: met.")


def test_hand_notes_are_separate_paragraphs_and_a_linked_teacher_has_no_epoch_time():
    rows = {"teacher": _row(0.90, 1000), "hidden_both@0": _row(0.89, 190), "_notes": ["first note", "second"]}
    text = "\n".join(recovery_report.report(rows))
    assert text.endswith("first note\n\nsecond")
    assert "nan" not in text and "trained in another store" in text
    rows["_teacher_epoch_minutes"] = 12.34
    assert "Teacher epoch on the training set: 12.3 min" in "\n".join(recovery_report.report(rows))


def test_every_recipe_builds_valid_training_arguments(tmp_path):
    import dataclasses

    from recovery_recipes import OFF, RECIPES

    from hf_rmtkd import RMTKDTrainingArguments

    base = RMTKDTrainingArguments(output_dir=str(tmp_path), report_to="none")
    fields = {f.name for f in dataclasses.fields(RMTKDTrainingArguments)}
    for name, (_, overrides) in RECIPES.items():
        assert set(overrides) <= fields, name
        # `replace` re-runs the arguments' validation, as `run_recipe` does.
        dataclasses.replace(base, **({**OFF, **overrides} if name.startswith("hidden") else overrides))


def test_stage_recipe_reduces_only_the_second_and_third_resnet_stages():
    from recovery_recipes import RECIPES

    from hf_rmtkd import ResNetCifarConfig, ResNetCifarForImageClassification
    from hf_rmtkd.sites import select_sites

    model = ResNetCifarForImageClassification(ResNetCifarConfig(depth=14, widths=[4, 8, 16], image_size=8))
    sites = select_sites(model, RECIPES["rmtkd_front_s23"][1]["reduction_target_modules"])
    stages = sorted({site.name.split(".")[0] for site in sites})
    assert stages == ["layer2", "layer3"] and len(sites) == 4


def test_baselines_matched_to_different_rows_are_kept_apart():
    rows = {"teacher": _row(0.90, 1000), "a@0": _row(0.88, 400)}
    # A store written before keys named the match: `svd@0`, matched to `b30@0`.
    rows["svd@0"] = {**_row(0.87, 390), "matched": "b30@0"}
    assert recovery_report.is_stored(rows, "svd", 0, "b30@0")
    assert not recovery_report.is_stored(rows, "svd", 0, "s23@0")  # another match is another row, not a skip
    key = recovery_report.row_key("svd", 0, "s23@0")
    assert key == "svd(s23@0)@0" and recovery_report.row_key("rmtkd_front", 1, "s23@0") == "rmtkd_front@1"
    rows[key] = {**_row(0.89, 380), "matched": "s23@0"}
    rows["svd(b30@0)@1"] = {**_row(0.85, 390), "matched": "b30@0"}
    assert recovery_report.is_stored(rows, "svd", 0, "s23@0")
    groups = [(group.label, len(group.seeds)) for group in recovery_report.grouped(rows)]
    label = bench_recovery.BASELINES["svd"]
    assert groups == [(f"{label} (matched to `b30@0`)", 2), (f"{label} (matched to `s23@0`)", 1)]
    text = "\n".join(recovery_report.report(rows))
    assert f"| {label} (matched to `b30@0`) | 2 | 86.00 ± 1.41 |" in text
    assert f"| {label} (matched to `s23@0`) | 1 | 89.00 |" in text


def test_a_parameter_count_stands_in_for_a_row_of_another_store_only_where_a_count_is_all_a_baseline_needs():
    rows = {"teacher": _row(0.90, 1000)}
    # `svd` reads the matched row's checkpoint, so a bare count cannot stand in for it; the check comes before any
    # model is touched (teacher, task and args are never used).
    with pytest.raises(ValueError, match="--match_params"):
        bench_recovery.run_baseline("svd", 0, None, None, None, rows, "rmtkd_conv@0", match_params=400)
    with pytest.raises(ValueError, match="not in the store yet"):
        bench_recovery.run_baseline("svd_size", 0, None, None, None, rows, "rmtkd_conv@0")
    # Where a count is all it needs, the count stands in; a stored row wins, and a count that contradicts it is refused.
    for name in ("svd_size", "layer_drop"):
        assert bench_recovery.baseline_target(name, rows, "rmtkd_conv@0", 405642) == {"params": 405642}
    rows["rmtkd_conv@0"] = _row(0.89, 400)
    assert bench_recovery.baseline_target("svd", rows, "rmtkd_conv@0") is rows["rmtkd_conv@0"]
    assert bench_recovery.baseline_target("svd_size", rows, "rmtkd_conv@0", 400) is rows["rmtkd_conv@0"]
    with pytest.raises(ValueError, match="contradicts"):
        bench_recovery.baseline_target("svd_size", rows, "rmtkd_conv@0", 405642)


def test_each_baseline_is_judged_against_every_seed_of_the_recipe_it_was_matched_to():
    rows = {"teacher": _row(0.90, 1000), "rmtkd_conv@0": _row(0.892, 400), "rmtkd_conv@2": _row(0.894, 400)}
    rows["svd_size(rmtkd_conv@0)@0"] = {**_row(0.895, 399), "matched": "rmtkd_conv@0"}
    rows["layer_drop(rmtkd_conv@0)@0"] = {**_row(0.87, 380), "matched": "rmtkd_conv@0"}
    rows["svd(hidden_both@0)@0"] = {**_row(0.80, 200), "matched": "hidden_both@0"}
    lines = recovery_report.report(rows)
    head = lines.index("## Target: at equal parameters, RMT-KD >= every baseline")
    recipe = bench_recovery.RECIPES["rmtkd_conv"][0] + " (2 seeds, 89.30%, 400 params)"
    svd_size, layer_drop, svd = (bench_recovery.BASELINES[n] for n in ("svd_size", "layer_drop", "svd"))
    # The standard error of 90% on 872 sentences is 1.02 points: 0.2 below is within it, 2.3 above is beyond it.
    assert lines[head + 2 : head + 5] == [
        f"- {svd} (matched to `hidden_both@0`): no row of its matched recipe in this store.",
        f"- {recipe} against {svd_size} (matched to `rmtkd_conv@0`) (1 seed, 89.50%, 399 params): -0.20 points, "
        "within the 1.02-point standard error: NOT met.",
        f"- {recipe} against {layer_drop} (matched to `rmtkd_conv@0`) (1 seed, 87.00%, 380 params): +2.30 points, "
        "beyond the 1.02-point standard error: met.",
    ]
    del rows["svd_size(rmtkd_conv@0)@0"], rows["layer_drop(rmtkd_conv@0)@0"], rows["svd(hidden_both@0)@0"]
    assert not any("equal parameters" in line for line in recovery_report.report(rows))
