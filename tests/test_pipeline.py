"""The one reduction pipeline and its typed records: `compress` and the trainer agree, a failure half-way changes
nothing, every kind records its provenance and spectrum, records round-trip and old formats convert."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_batches, tiny_model
from testing_utils import labelled_dataset, planted_llama, tiny_classifier, token_ids, trainer_args
from torch.utils.data import DataLoader
from transformers import default_data_collator

import hf_rmtkd
from hf_rmtkd import RMTKDConfig, RMTKDTrainer
from hf_rmtkd.kept_basis import stream_maps
from hf_rmtkd.pipeline import ReductionPlan
from hf_rmtkd.records import (
    FORMAT_VERSION,
    HIDDEN_SITE,
    FFNRecord,
    HiddenRecord,
    LinearRecord,
    record_from_dict,
    upgrade_records,
)


def test_compress_and_the_trainer_reach_the_same_ranks_on_the_same_data(tmp_path):
    calibration = labelled_dataset(64, seed=3)
    loader = DataLoader(calibration, batch_size=32, collate_fn=default_data_collator)
    compressed = hf_rmtkd.compress(tiny_classifier(), loader, progress=False, seed=0)
    args = trainer_args(tmp_path, max_steps=1, reduction_schedule="all_at_once", per_device_eval_batch_size=32)
    trainer = RMTKDTrainer(
        model=tiny_classifier(), args=args, train_dataset=labelled_dataset(32), calibration_dataset=calibration
    )
    trainer.train()
    assert trainer.reduction_callback.history, "the trainer made no reduction"
    ranks = {name: record.rank for name, record in compressed.config.reduced_modules.items()}
    assert ranks, "compress reduced nothing: the comparison would be empty"
    assert {name: record.rank for name, record in trainer.model.config.reduced_modules.items()} == ranks
    assert trainer.model.config.calibration["fingerprint"] == compressed.config.calibration["fingerprint"]


class _FailsOnPass:
    """Calibration batches from a source that fails on pass `fail_on` (a file deleted mid-run, a dropped mount)."""

    def __init__(self, batches, fail_on: int):
        self.batches, self.fail_on, self.passes = batches, fail_on, 0

    def __iter__(self):
        self.passes += 1
        if self.passes == self.fail_on:
            raise OSError("calibration source went away")
        return iter(self.batches)


def test_a_reduction_that_fails_half_way_leaves_the_model_unchanged():
    model, _ = planted_llama()
    ids = token_ids(seed=5)
    with torch.no_grad():
        before = model(ids).logits
    wrapper = hf_rmtkd.to_rmtkd(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    data = _FailsOnPass([{"input_ids": token_ids(seed)} for seed in range(8)], fail_on=2)
    # Pass 1 (hidden width) succeeds and slices a new model; pass 2 (the other sites) fails.
    with pytest.raises(OSError, match="went away"):
        hf_rmtkd.compress(wrapper, data, hidden_width=True, progress=False)
    assert data.passes == 2
    assert wrapper.model is model and wrapper.config.hidden_width is None and wrapper.config.reduced_modules == {}
    assert wrapper.config.calibration == {} and stream_maps(wrapper) == [] and not wrapper.rmtkd_spectra
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with torch.no_grad():
        torch.testing.assert_close(wrapper(ids).logits, before, rtol=0, atol=0)


def test_a_hidden_width_only_compress_records_provenance_and_its_spectrum(tmp_path):
    model, _ = planted_llama()
    batches = [{"input_ids": token_ids(seed)} for seed in range(8)]
    compressed = hf_rmtkd.compress(model, batches, hidden_width=True, target_modules=[], progress=False, seed=3)
    record = compressed.config.hidden_width
    assert isinstance(record, HiddenRecord) and record.rank == 12 < record.dim == 32
    assert compressed.config.reduced_modules == {} and compressed.config.ranks() == {HIDDEN_SITE: 12}
    calibration = compressed.config.calibration
    assert len(calibration["fingerprint"]) == 64 and calibration["n_tokens"] == 8 * 30 and calibration["seed"] == 3
    assert record.sigma2 > 0 and record.lambda_plus > record.sigma2 and record.n_samples == 8 * 30
    assert compressed.rmtkd_spectra[HIDDEN_SITE].eigenvalues.numel() == 32
    compressed.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["format_version"] == FORMAT_VERSION and saved["hidden_width"]["rank"] == 12
    assert "<hidden_size>" not in saved["reduced_modules"]


def test_the_names_written_are_the_names_recorded():
    entries = ["output.dense", "query", "value"]  # as in the README
    compressed = hf_rmtkd.compress(tiny_model("bert"), tiny_batches("bert"), target_modules=entries, progress=False)
    names = set(compressed.config.reduced_modules)
    assert any(isinstance(r, FFNRecord) for r in compressed.config.reduced_modules.values())
    assert all(any(name.endswith("." + entry) for entry in entries) for name in names)
    # The writer's name selects the same FFN sites, recorded under the same names.
    by_producer = hf_rmtkd.analyze(tiny_model("bert"), tiny_batches("bert"), ["intermediate.dense"], progress=False)
    by_consumer = hf_rmtkd.analyze(
        tiny_model("bert"), tiny_batches("bert"), r".*layer\.\d+\.output\.dense", progress=False
    )
    assert list(by_producer) == list(by_consumer) == [f"encoder.layer.{i}.output.dense" for i in range(2)]


class TestRecords:
    def test_round_trip_keeps_every_field_and_unknown_keys(self):
        values = {
            "kind": "ffn",
            "in_features": 37,
            "out_features": 32,
            "rank": 6,
            "producers": ["a.fc1"],
            "sigma2": 0.5,
            "from_a_newer_version": [1, 2],
        }
        record = record_from_dict(values)
        assert isinstance(record, FFNRecord) and record.extra == {"from_a_newer_version": [1, 2]}
        assert record.to_dict() == values

    @pytest.mark.parametrize(
        "values,match",
        [
            ({"kind": "linear", "in_features": 4, "out_features": 4, "rank": True}, r"rank` must be a positive int"),
            ({"kind": "hidden", "rank": 8, "config_overrides": {"hidden_size": 12}}, r"differs from the width"),
            ({"kind": "hidden", "rank": 8, "dim": 4, "config_overrides": {"hidden_size": 8}}, r"exceeds `dim`"),
            ({"kind": "hidden", "rank": 8, "config_overrides": {}}, r"config_overrides` must be a non-empty dict"),
        ],
    )
    def test_bad_values_name_the_field(self, values, match):
        with pytest.raises(ValueError, match=match):
            record_from_dict(values, "somewhere")

    def test_format_1_moves_the_hidden_width_to_its_own_field(self):
        legacy = {
            "<hidden_size>": {
                "kind": "hidden",
                "in_features": 32,
                "out_features": 32,
                "dim": 32,
                "rank": 12,
                "config_overrides": {"hidden_size": 12},
            },
            "layers.0.mlp.down_proj": {
                "kind": "ffn",
                "in_features": 37,
                "out_features": 12,
                "rank": 5,
                "producers": ["layers.0.mlp.up_proj"],
            },
        }
        modules, hidden = upgrade_records(legacy, None, None)
        assert set(modules) == {"layers.0.mlp.down_proj"} and isinstance(hidden, HiddenRecord)
        assert (hidden.dim, hidden.rank) == (32, 12) and "in_features" not in hidden.to_dict()

    def test_a_newer_format_is_refused(self):
        with pytest.raises(ValueError, match="newer hf_rmtkd"):
            RMTKDConfig(base_config={"model_type": "bert"}, format_version=FORMAT_VERSION + 1)

    def test_config_holds_typed_records_and_writes_dicts(self):
        compressed = hf_rmtkd.compress(tiny_model("bert"), tiny_batches("bert"), progress=False)
        records = compressed.config.reduced_modules
        assert records and all(isinstance(r, (FFNRecord, LinearRecord)) for r in records.values())
        written = compressed.config.to_dict()["reduced_modules"]
        assert written == {path: record.to_dict() for path, record in records.items()}
        assert RMTKDConfig.from_dict(compressed.config.to_dict()).reduced_modules == records


class TestPlan:
    @pytest.mark.parametrize(
        "values,match",
        [
            ({"hidden_steps_left": -1}, "hidden_steps_left"),
            ({"ffn_method": "fold"}, "ffn_method"),
            ({"relaxation": 1.0}, "relaxation"),
            ({"hidden_width": 8}, "hidden_width"),
        ],
    )
    def test_bad_values_raise(self, values, match):
        with pytest.raises(ValueError, match=match):
            ReductionPlan(**values)


def test_one_progress_bar_per_reduction_and_none_when_silenced(capsys):
    model, _ = planted_llama()
    batches = [{"input_ids": token_ids(seed)} for seed in range(8)]
    hf_rmtkd.compress(model, batches, hidden_width=True, progress=True)
    bars = capsys.readouterr().err
    # Two calibration passes (hidden width, then the sites), one bar: a single description prefix, counted in tokens.
    assert "RMT-KD reduction" in bars and "calibration" not in bars and "tok" in bars
    model, _ = planted_llama()
    hf_rmtkd.compress(model, batches, hidden_width=True, progress=False)
    assert capsys.readouterr().err == ""


def test_a_one_line_summary_per_reduction_is_logged(caplog):
    caplog.set_level("INFO", logger="hf_rmtkd.pipeline")
    compressed = hf_rmtkd.compress(tiny_classifier(), [{"input_ids": token_ids(s)} for s in range(4)], progress=False)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "hf_rmtkd.pipeline"]
    assert f"{len(compressed.config.reduced_modules)} of" in line and "parameters" in line and "fewer" in line
