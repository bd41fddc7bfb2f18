"""Hub sharing against a real HTTP server on 127.0.0.1 (tests/hub_server.py, started by conftest.py)."""

import json
import os
import subprocess
import sys
import textwrap
import uuid

import huggingface_hub
import pytest
import torch
import transformers as tf
from conftest import HUB, REPO_ROOT, tiny_batches, tiny_model
from hub_server import start_server
from huggingface_hub import HfApi
from huggingface_hub.errors import RepositoryNotFoundError

import hf_rmtkd


try:  # the HTTP client huggingface_hub uses: httpx2 for huggingface_hub 2.x, httpx for 1.x
    import httpx2 as http_client
except ImportError:
    import httpx as http_client


CODE_FILES = {"configuration_rmtkd.py", "modeling_rmtkd.py", "surgery.py", "layers.py", "sites.py"}


def _repo_id() -> str:
    return f"testuser/rt-{uuid.uuid4().hex[:8]}"


def _compressed(seed: int = 0):
    model = tiny_model("bert", "sequence", seed=seed)
    return hf_rmtkd.compress(model, tiny_batches("bert", n_batches=8), progress=False).eval()


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def compressed():
    return _compressed()


@pytest.fixture(scope="module")
def pushed(compressed):
    """A compressed tiny BERT pushed once: (repo id, commit info)."""
    repo_id = _repo_id()
    info = compressed.push_to_hub(
        repo_id,
        model_card_kwargs={"datasets": ["stanfordnlp/sst2"], "metrics": {"accuracy": (0.9, 0.89)}},
    )
    return repo_id, info


class TestPushAndLoad:
    def test_push_uploads_weights_config_code_card_and_plots(self, pushed, compressed):
        repo_id, _ = pushed
        files = set(HfApi().list_repo_files(repo_id))
        assert {"config.json", "model.safetensors", "README.md"} <= files
        assert CODE_FILES <= files
        plots = sorted(f for f in files if f.startswith("spectra/") and f.endswith(".png"))
        assert len(plots) == len(compressed.rmtkd_spectra) > 0
        card = huggingface_hub.ModelCard.load(repo_id)
        assert "rmt-kd" in card.data.tags
        for plot in plots:
            assert f"]({plot})" in card.text
        assert compressed.config.reduced_modules
        for name, record in compressed.config.reduced_modules.items():
            assert f"`{name}`" in card.text
            assert f"-> {record.rank} |" in card.text
        results = card.data.eval_results
        assert results[0].metric_type == "accuracy" and results[0].metric_value == pytest.approx(0.89)

    def test_from_pretrained_by_repo_id_gives_identical_outputs(self, pushed, compressed):
        repo_id, _ = pushed
        loaded = tf.AutoModelForSequenceClassification.from_pretrained(repo_id).eval()
        assert type(loaded).__name__ == "RMTKDForSequenceClassification"
        batch = tiny_batches("bert", n_batches=1, seed=5)[0]
        torch.testing.assert_close(_logits(loaded, batch), _logits(compressed, batch), rtol=0, atol=1e-6)
        assert loaded.num_parameters() == compressed.num_parameters()

    def test_pipeline_loads_by_repo_id(self, pushed):
        repo_id, _ = pushed
        classifier = tf.pipeline("text-classification", model=repo_id, tokenizer=_tokenizer())
        assert len(classifier("hello world")) == 1

    def test_unchanged_re_push_makes_no_commit(self, pushed, compressed):
        repo_id, _ = pushed
        api = HfApi()
        before = [c.commit_id for c in api.list_repo_commits(repo_id)]
        compressed.push_to_hub(
            repo_id,
            model_card_kwargs={"datasets": ["stanfordnlp/sst2"], "metrics": {"accuracy": (0.9, 0.89)}},
        )
        assert [c.commit_id for c in api.list_repo_commits(repo_id)] == before

    def test_save_pretrained_with_push_uploads_the_finished_folder(self, tmp_path, compressed):
        repo_id = _repo_id()
        compressed.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id=repo_id)
        local = json.loads((tmp_path / "local" / "config.json").read_text())
        assert local["weights_sha256"]
        files = set(HfApi().list_repo_files(repo_id))
        assert {"config.json", "model.safetensors", "README.md"} | CODE_FILES <= files
        remote = json.loads(open(huggingface_hub.hf_hub_download(repo_id, "config.json")).read())
        assert remote["weights_sha256"] == local["weights_sha256"]  # the hash was written before the upload
        assert "rmt-kd" in huggingface_hub.ModelCard.load(repo_id).data.tags
        loaded = tf.AutoModelForSequenceClassification.from_pretrained(repo_id)  # verifies that hash
        assert loaded.num_parameters() == compressed.num_parameters()

    def test_older_revision_loads_the_older_weights(self):
        repo_id = _repo_id()
        first, second = _compressed(seed=0), _compressed(seed=1)
        old = first.push_to_hub(repo_id).oid
        second.push_to_hub(repo_id)
        batch = tiny_batches("bert", n_batches=1, seed=5)[0]
        at_old = tf.AutoModelForSequenceClassification.from_pretrained(repo_id, revision=old).eval()
        latest = tf.AutoModelForSequenceClassification.from_pretrained(repo_id).eval()
        torch.testing.assert_close(_logits(at_old, batch), _logits(first, batch), rtol=0, atol=1e-6)
        torch.testing.assert_close(_logits(latest, batch), _logits(second, batch), rtol=0, atol=1e-6)
        assert not torch.allclose(_logits(at_old, batch), _logits(latest, batch))

    def test_missing_repo_raises_repository_not_found(self):
        with pytest.raises(RepositoryNotFoundError):
            HfApi().model_info("testuser/does-not-exist")
        with pytest.raises(OSError, match="testuser/does-not-exist"):
            tf.AutoModelForSequenceClassification.from_pretrained("testuser/does-not-exist")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "hello": 4, "world": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


class TestRemoteCode:
    def test_checkpoint_loads_with_trust_remote_code_without_hf_rmtkd(self, tmp_path, compressed):
        compressed.save_pretrained(tmp_path / "model")
        config = json.loads((tmp_path / "model" / "config.json").read_text())
        assert config["auto_map"]["AutoModelForSequenceClassification"] == (
            "modeling_rmtkd.RMTKDForSequenceClassification"
        )
        assert CODE_FILES <= {p.name for p in (tmp_path / "model").iterdir()}
        batch = tiny_batches("bert", n_batches=1, seed=5)[0]
        torch.save({"batch": batch, "logits": _logits(compressed, batch)}, tmp_path / "expected.pt")
        script = textwrap.dedent(
            f"""
            import sys
            sys.modules["hf_rmtkd"] = None  # hf_rmtkd cannot be imported in this process
            try:
                import hf_rmtkd
            except ImportError:
                pass
            else:
                raise SystemExit("hf_rmtkd is importable")
            import torch
            from transformers import AutoModelForSequenceClassification
            expected = torch.load({str(tmp_path / "expected.pt")!r})
            try:
                AutoModelForSequenceClassification.from_pretrained({str(tmp_path / "model")!r})
            except ValueError as error:
                assert "trust_remote_code" in str(error), error
            else:
                raise SystemExit("loaded without trust_remote_code")
            model = AutoModelForSequenceClassification.from_pretrained(
                {str(tmp_path / "model")!r}, trust_remote_code=True
            ).eval()
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            with torch.no_grad():
                logits = model(**expected["batch"]).logits
            torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-6)
            print("REMOTE-CODE-OK", type(model).__name__)
            """
        )
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "REMOTE-CODE-OK RMTKDForSequenceClassification" in result.stdout

    def test_repo_loads_with_trust_remote_code_without_hf_rmtkd(self, pushed):
        repo_id, _ = pushed
        script = textwrap.dedent(
            f"""
            import sys
            sys.modules["hf_rmtkd"] = None
            from transformers import AutoModelForSequenceClassification
            model = AutoModelForSequenceClassification.from_pretrained({repo_id!r}, trust_remote_code=True)
            print("PARAMS", model.num_parameters())
            """
        )
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        loaded = tf.AutoModelForSequenceClassification.from_pretrained(repo_id)
        assert f"PARAMS {loaded.num_parameters()}" in result.stdout


class TestTrainerPush:
    def test_trainer_push_uploads_card_with_metrics_plots_and_a_loadable_model(self, tmp_path):
        from testing_utils import labelled_dataset as _dataset
        from testing_utils import tiny_classifier as _classifier
        from testing_utils import trainer_args as _args

        repo_id = _repo_id()

        def accuracy(prediction):
            return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

        # eval_on_start measures the model before any reduction: the card's "before" column.
        args = _args(tmp_path, num_train_epochs=2, hub_model_id=repo_id, eval_strategy="epoch", eval_on_start=True)
        trainer = hf_rmtkd.RMTKDTrainer(
            model=_classifier(),
            args=args,
            train_dataset=_dataset(),
            eval_dataset=_dataset(32, seed=1),
            compute_metrics=accuracy,
        )
        trainer.train()
        evals = [log["eval_accuracy"] for log in trainer.state.log_history if "eval_accuracy" in log]
        before, after = evals[0], evals[-1]
        trainer.push_to_hub(dataset_tags="stanfordnlp/sst2", latency_ratio=0.5)

        files = set(HfApi().list_repo_files(repo_id))
        assert {"config.json", "model.safetensors", "README.md", "modeling_rmtkd.py"} <= files
        plots = sorted(f for f in files if f.startswith("spectra/reduction_"))
        assert {p.split("/")[1] for p in plots} == {"reduction_00", "reduction_01"}
        card = huggingface_hub.ModelCard.load(repo_id)
        assert f"| eval_accuracy | {before:.4g} | {after:.4g} |" in card.text
        assert "| latency (after / before) | 1 | 0.5 |" in card.text
        assert all(f"]({p})" in card.text for p in plots)
        assert card.data.datasets == ["stanfordnlp/sst2"] and "rmt-kd" in card.data.tags

        loaded = tf.AutoModelForSequenceClassification.from_pretrained(repo_id).eval()
        batch = {"input_ids": torch.randint(5, 99, (3, 12)), "attention_mask": torch.ones(3, 12, dtype=torch.long)}
        trainer.model.eval()
        torch.testing.assert_close(_logits(loaded, batch), _logits(trainer.model, batch), rtol=0, atol=1e-6)
        assert loaded.num_parameters() == trainer.model.num_parameters() < _classifier().num_parameters()


class TestInterruptedUpload:
    def test_server_dying_mid_upload_raises_and_keeps_the_local_checkpoint(self, tmp_path, compressed, monkeypatch):
        dying = start_server(tmp_path / "storage", die_on_commit=True)
        try:
            monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", dying.url)
            compressed.save_pretrained(tmp_path / "local")
            before = {p.name: p.read_bytes() for p in (tmp_path / "local").iterdir()}
            # The server drops the connection: a transport error, not a silent success or an error of ours.
            with pytest.raises((http_client.TransportError, ConnectionError)):
                compressed.push_to_hub("testuser/dies")
            assert not dying.alive()
        finally:
            dying.stop()
        after = {p.name: p.read_bytes() for p in (tmp_path / "local").iterdir()}
        assert after == before
        reloaded = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "local").eval()
        batch = tiny_batches("bert", n_batches=1, seed=5)[0]
        torch.testing.assert_close(_logits(reloaded, batch), _logits(compressed, batch), rtol=0, atol=1e-6)
        assert HUB.alive()


def test_server_module_is_the_one_conftest_started():
    assert os.environ["HF_ENDPOINT"] == HUB.url == huggingface_hub.constants.ENDPOINT
    assert (REPO_ROOT / "tests" / "hub_server.py").exists()
