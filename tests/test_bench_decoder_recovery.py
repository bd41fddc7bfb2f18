"""The decoder-recovery benchmark's plan parsing and report (the run itself needs SmolLM2 from pip: a script)."""

import re
import sys

import pytest
from testing_utils import BENCHMARKS


sys.path.insert(0, str(BENCHMARKS))
from bench_decoder_recovery import DecoderRecoveryArguments, report  # noqa: E402


def _data(tmp_path):
    (tmp_path / "wiki.test.raw").write_text("text")
    return str(tmp_path)


def test_plans_parse_into_compress_arguments_and_a_bad_plan_names_itself(tmp_path):
    bench = DecoderRecoveryArguments(data_dir=_data(tmp_path), plans="mp, mp+budget 0.03")
    assert bench.plan_kwargs() == {"mp": {}, "mp+budget 0.03": {"max_output_error": 0.03}}
    with pytest.raises(ValueError, match=re.escape("'mp+budget x'")):
        DecoderRecoveryArguments(data_dir=_data(tmp_path), plans="mp+budget x")
    with pytest.raises(ValueError, match="'svd' is unknown"):
        DecoderRecoveryArguments(data_dir=_data(tmp_path), plans="svd")
    with pytest.raises(ValueError, match="wiki.test.raw"):
        DecoderRecoveryArguments(data_dir=str(tmp_path / "missing"))


def test_report_judges_the_recovered_perplexity_against_the_target():
    rows = {"teacher": {"ppl": 40.0, "params": 1000, "generations": ["a", "b", "c"]}}
    row = {"ppl_before": 200.0, "params": 700, "recovery_tokens": 1024, "recovery_minutes": 3.0}
    rows["mp, 4 steps"] = {**row, "ppl": 48.0, "generations": ["d", "e", "f"]}
    rows["mp+budget 0.03, 4 steps"] = {**row, "ppl": 52.0, "params": 900, "generations": ["g", "h", "i"]}
    lines = report(rows)
    assert "| mp, 4 steps | 200.0 -> 48.0 | 1.20x | 700 (30.0% fewer) | 1,024 | 3 |" in lines
    assert "- mp, 4 steps: 30.0% fewer at 1.20x the teacher's perplexity: met." in lines
    assert "- mp+budget 0.03, 4 steps: 10.0% fewer at 1.30x the teacher's perplexity: NOT met." in lines
