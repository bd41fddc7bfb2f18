"""The model card: every field rendered from the config and the caller's figures, unknowns shown, never a crash."""

import math

import pytest
from conftest import REPO_ROOT, tiny_batches, tiny_model

import hf_rmtkd
from hf_rmtkd.model_card import build_model_card, metrics_from_log_history, reduced_module_rows, template_path


@pytest.fixture(scope="module")
def compressed():
    return hf_rmtkd.compress(tiny_model("bert", "sequence"), tiny_batches("bert", n_batches=8), progress=False)


class TestBuildModelCard:
    def test_every_field_is_rendered(self, compressed):
        uncompressed = sum(p.numel() for p in tiny_model("bert", "sequence").parameters())
        card = build_model_card(
            compressed,
            repo_id="testuser/tiny-rmtkd",
            base_model="sentence-transformers/all-MiniLM-L6-v2",
            datasets=["stanfordnlp/sst2"],
            metrics={"eval_accuracy": (0.9123, 0.9087)},
            latency_ratio=0.55,
            plots=["spectra/spectrum_bert.encoder.layer.0.output.dense.png"],
        )
        text = card.text
        assert f"| parameters | {uncompressed:,} | {compressed.num_parameters():,} (x" in text
        assert "| eval_accuracy | 0.9123 | 0.9087 |" in text
        assert "| latency (after / before) | 1 | 0.55 |" in text
        assert (
            "![spectrum of bert.encoder.layer.0.output.dense](spectra/spectrum_bert.encoder.layer.0.output.dense.png)"
            in text
        )
        rows = reduced_module_rows(compressed.config)
        assert len(rows) == len(compressed.config.reduced_modules) > 0
        for row in rows:
            assert (
                f"| `{row['name']}` | {row['kind']} | {row['dim']} -> {row['rank']} | {row['ranks']} | {row['sigma2']} |"
                in text
            )
            assert row["sigma2"] != "unknown" and row["lambda_plus"] != "unknown"
        assert 'AutoModelForSequenceClassification.from_pretrained("testuser/tiny-rmtkd")' in text
        assert "trust_remote_code=True" in text
        assert "@article{ettori2025rmtkd" in text and "arXiv 2509.15724" in text
        assert "Datasets: stanfordnlp/sst2." in text
        data = card.data
        assert data.library_name == "transformers" and "rmt-kd" in data.tags
        assert data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
        assert data.datasets == ["stanfordnlp/sst2"] and data.pipeline_tag == "text-classification"
        (result,) = data.eval_results
        assert (result.metric_type, result.metric_value, result.dataset_type) == (
            "accuracy",
            0.9087,
            "stanfordnlp/sst2",
        )
        assert "model-index" in data.to_dict()

    def test_missing_values_show_as_unknown(self):
        bare = hf_rmtkd.to_rmtkd(tiny_model("bert", "sequence"))
        card = build_model_card(bare, metrics={"accuracy": (None, math.nan)}, latency_ratio=None)
        text = card.text
        assert "| accuracy | unknown | unknown |" in text
        assert "| latency (after / before) | 1 | unknown |" in text
        assert "Datasets: unknown." in text and "Calibration: unknown." in text
        assert "| none | | | | |" in text and "No spectrum plots" in text
        assert card.data.eval_results is None and card.data.base_model is None

    def test_the_packaged_template_is_the_top_level_one(self):
        # One template: the package's; the top-level copy (the design card's file) must not drift from it.
        assert template_path() == REPO_ROOT / "hf_rmtkd" / "templates" / "model_card_template.md"
        assert template_path().read_text() == (REPO_ROOT / "model_card_template.md").read_text()


class TestMetricsFromLogHistory:
    def test_first_eval_before_the_first_reduction_and_last_eval_after_it(self):
        history = [
            {"eval_accuracy": 0.80, "eval_loss": 0.5, "eval_runtime": 1.0, "step": 0},
            {"loss": 0.7, "step": 5},
            {"eval_accuracy": 0.70, "eval_loss": 0.8, "step": 10},
            {"eval_accuracy": 0.78, "eval_loss": 0.6, "step": 20},
        ]
        metrics = metrics_from_log_history(history, first_reduction_step=3)
        assert metrics == {"eval_accuracy": (0.80, 0.78), "eval_loss": (0.5, 0.6)}

    def test_no_reduction_and_no_eval(self):
        assert metrics_from_log_history([{"loss": 1.0, "step": 1}], None) == {}
        assert metrics_from_log_history([{"eval_loss": 0.4, "step": 2}], None) == {"eval_loss": (None, 0.4)}
