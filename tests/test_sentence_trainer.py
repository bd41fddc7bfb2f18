"""`RMTKDTrainer` given a SentenceTransformer: scheduled reductions with embedding self-distillation, on a tiny BERT."""

from __future__ import annotations

import pytest
import torch
from testing_utils import random_sentences, tiny_sentence_transformer

import hf_rmtkd
from hf_rmtkd.distillation import embedding_distance
from hf_rmtkd.sentence_models import compress_sentence_transformer, fold_downstream
from hf_rmtkd.sentence_trainer import RMTKDSentenceTransformerTrainer, SentenceCollator


st = pytest.importorskip("sentence_transformers")
from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling  # noqa: E402


def _args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "run"), num_train_epochs=3, per_device_train_batch_size=16, learning_rate=5e-4,
        report_to="none", save_strategy="no", logging_steps=4, use_cpu=True, disable_tqdm=True, seed=0,
        reduction_hidden_width=True, reduction_target_modules=[],
    )  # fmt: skip
    return hf_rmtkd.RMTKDTrainingArguments(**{**settings, **overrides})


# -- the loss, as a pure function ------------------------------------------------------------------------------


@pytest.mark.parametrize("distance", ["cosine", "mse", "l2"])
def test_embedding_distance_is_zero_at_the_target_and_exact_under_accumulation(distance):
    torch.manual_seed(0)
    student, target = torch.randn(8, 5, requires_grad=True), torch.randn(8, 5)
    assert float(embedding_distance(target, target, distance).abs().max()) < 1e-6
    full = embedding_distance(student, target, distance).sum() / 8
    (whole,) = torch.autograd.grad(full, student)
    halves = sum(embedding_distance(student[i : i + 4], target[i : i + 4], distance).sum() / 8 for i in (0, 4))
    (accumulated,) = torch.autograd.grad(halves, student)
    torch.testing.assert_close(accumulated, whole)
    assert float(full) > 0.1


def test_embedding_distance_refuses_bad_input():
    with pytest.raises(ValueError, match="`distance` must be one of"):
        embedding_distance(torch.ones(2, 3), torch.ones(2, 3), "dot")
    with pytest.raises(ValueError, match="differ in shape"):
        embedding_distance(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="distillation_embedding_distance"):
        hf_rmtkd.RMTKDTrainingArguments(output_dir="unused", distillation_embedding_distance="dot")


# -- modules after the transformer follow the width ------------------------------------------------------------


def test_a_dense_layer_after_pooling_is_folded_exactly_on_the_kept_subspace():
    torch.manual_seed(0)
    pooling, dense = Pooling(8), Dense(8, 4)
    basis, _ = torch.linalg.qr(torch.randn(8, 3))
    tokens = torch.randn(2, 5, 3)  # reduced token states z; the full ones are z Q^T
    mask = torch.ones(2, 5, dtype=torch.long)
    full = dense(Pooling(8)({"token_embeddings": tokens @ basis.T, "attention_mask": mask}))["sentence_embedding"]
    modules = [pooling, dense, Normalize()]
    fold_downstream(modules, basis)
    assert pooling.get_embedding_dimension() == 3 and dense.in_features == 3 and dense.get_embedding_dimension() == 4
    flow = {"token_embeddings": tokens, "attention_mask": mask}
    for module in modules[:2]:
        flow = module(flow)
    torch.testing.assert_close(flow["sentence_embedding"], full)


def test_modules_with_parameters_before_a_dense_layer_are_refused():
    from sentence_transformers.sentence_transformer.modules import LayerNorm

    with pytest.raises(NotImplementedError, match="LayerNorm"):
        fold_downstream([Pooling(8), LayerNorm(8)], torch.linalg.qr(torch.randn(8, 3))[0])


def test_compress_carries_the_hidden_width_through_a_dense_layer(tmp_path):
    folder = tiny_sentence_transformer(tmp_path, dense=16)
    original = st.SentenceTransformer(str(folder), device="cpu")
    model = compress_sentence_transformer(
        str(folder), random_sentences(128, 0), progress=False, hidden_width=True, target_modules=[]
    )
    assert model[0].model.model.config.hidden_size < 32 and model.get_embedding_dimension() == 16
    probe = random_sentences(32, 1)
    new, old = model.encode(probe, convert_to_tensor=True), original.encode(probe, convert_to_tensor=True)
    # Folded: the output keeps the original Dense layer's meaning. Unfolded (the old behaviour) it could not even run.
    assert float(torch.nn.functional.cosine_similarity(new, old).mean()) > 0.8
    model.save(str(tmp_path / "out"))
    reloaded = st.SentenceTransformer(str(tmp_path / "out"), device="cpu")
    torch.testing.assert_close(reloaded.encode(probe, convert_to_tensor=True), new, rtol=0, atol=1e-5)


# -- data ------------------------------------------------------------------------------------------------------


def test_the_collator_tokenizes_raw_sentences_with_the_models_own_tokenizer(tmp_path):
    model = st.SentenceTransformer(str(tiny_sentence_transformer(tmp_path)), device="cpu")
    batch = SentenceCollator(model)([{"sentence": "good film", "idx": 3}, {"sentence": "bad plot", "idx": 4}])
    torch.testing.assert_close(batch["input_ids"], model.preprocess(["good film", "bad plot"])["input_ids"])
    assert SentenceCollator(model)(["good film"])["input_ids"].shape == (1, 4)
    with pytest.raises(ValueError, match="Cannot tell the text column"):
        SentenceCollator(model)([{"premise": "good", "hypothesis": "bad"}])
    chosen = SentenceCollator(model, column="premise")([{"premise": "good", "hypothesis": "bad"}])["input_ids"]
    assert chosen.shape and torch.equal(chosen, model.preprocess(["good"])["input_ids"])
    with pytest.raises(TypeError, match="raw sentences"):
        SentenceCollator(model)([[1, 2, 3]])


# -- training --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("teacher", ["self", "original"])
def test_the_trainer_reduces_a_sentence_transformer_and_distillation_recovers_it(tmp_path, teacher):
    folder = tiny_sentence_transformer(tmp_path, dropout=0.0)
    train, held_out = random_sentences(256, 0), random_sentences(64, 1)
    losses = {}
    for lr in (0.0, 5e-4):
        args = _args(tmp_path / str(lr), learning_rate=lr, distillation_teacher=teacher)
        trainer = hf_rmtkd.RMTKDTrainer(model=str(folder), args=args, train_dataset=train, eval_dataset=held_out)
        if teacher == "original":  # the model as given: the training target and the eval reference from the start
            assert trainer.teacher is trainer.reference and trainer.teacher.model.config.hidden_size == 32
        assert isinstance(trainer, RMTKDSentenceTransformerTrainer) and isinstance(trainer, hf_rmtkd.RMTKDTrainer)
        assert trainer.evaluate()["eval_loss"] < 1e-6  # before any reduction the model is its own reference
        trainer.train()
        assert trainer.model.model.config.hidden_size < 32
        losses[lr] = trainer.evaluate()["eval_loss"]
    # Same reduction (at step 0, before any update), then recovery by the embedding loss alone.
    assert losses[5e-4] < 0.7 * losses[0.0], losses
    logged = [log for log in trainer.state.log_history if "embedding_loss" in log]
    assert logged and logged[-1]["embedding_loss"] < logged[0]["embedding_loss"]
    trainer.save_model(str(tmp_path / "out"))
    reloaded = st.SentenceTransformer(str(tmp_path / "out"), device="cpu")
    assert [type(m).__name__ for m in reloaded] == ["Transformer", "Pooling", "Normalize"]
    assert reloaded.get_embedding_dimension() == trainer.model.model.config.hidden_size
    expected = trainer.sentence_model.encode(held_out, convert_to_tensor=True)
    torch.testing.assert_close(reloaded.encode(held_out, convert_to_tensor=True), expected, rtol=0, atol=1e-5)


def test_layerwise_schedule_with_hidden_term_and_an_external_teacher(tmp_path):
    folder = tiny_sentence_transformer(tmp_path, dense=16)
    teacher = st.SentenceTransformer(str(folder), device="cpu")
    args = _args(
        tmp_path, num_train_epochs=2, reduction_target_modules=None, distillation_teacher="external",
        distillation_hidden_weight=1.0,
    )  # fmt: skip
    trainer = hf_rmtkd.RMTKDTrainer(
        model=st.SentenceTransformer(str(folder), device="cpu"), args=args, teacher_model=teacher,
        train_dataset=random_sentences(128, 0),
    )  # fmt: skip
    before = trainer.model.num_parameters()
    trainer.train()
    history = trainer.reduction_callback.history
    assert len(history) == 3 and history[0]["reduced"] == ["hidden_size"]  # width, then each of the 2 layers
    assert trainer.model.num_parameters() < before
    keys = {key for log in trainer.state.log_history for key in log}
    assert {"embedding_loss", "hidden_loss"} <= keys and "ce_loss" not in keys
    assert trainer.sentence_model.get_embedding_dimension() == 16  # the Dense layer was folded, its width kept
    assert trainer.sentence_model.encode(["good film"]).shape == (1, 16)


def test_a_resumed_run_refolds_the_modules_after_the_transformer(tmp_path):
    folder = tiny_sentence_transformer(tmp_path)
    train = random_sentences(128, 0)
    args = _args(tmp_path, num_train_epochs=2, save_strategy="steps", save_steps=8)
    hf_rmtkd.RMTKDTrainer(model=str(folder), args=args, train_dataset=train).train()
    resumed = hf_rmtkd.RMTKDTrainer(model=str(folder), args=args, train_dataset=train)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-8"))
    width = resumed.model.model.config.hidden_size
    assert width < 32 and resumed.sentence_model.get_embedding_dimension() == width
    assert resumed.sentence_model.encode(["good film"]).shape == (1, width)


def test_bad_input_to_the_sentence_trainer(tmp_path):
    folder = tiny_sentence_transformer(tmp_path)
    with pytest.raises(TypeError, match="must be a SentenceTransformer"):
        hf_rmtkd.RMTKDTrainer(
            model=str(folder), args=_args(tmp_path, distillation_teacher="external"),
            teacher_model=hf_rmtkd.AutoModel.from_pretrained(str(tmp_path / "bert")),
        )  # fmt: skip
    trainer = hf_rmtkd.RMTKDTrainer(
        model=str(folder), args=_args(tmp_path), train_dataset=[{"premise": "good", "hypothesis": "bad"}] * 4
    )
    with pytest.raises(ValueError, match="Cannot tell the text column"):
        trainer.train()


def test_the_metric_budget_undoes_a_reduction_and_the_modules_follow(tmp_path):
    # Any move away from the reference breaks a zero budget: the reduction is undone, and the Dense layer unfolds again.
    folder = tiny_sentence_transformer(tmp_path, dense=16, dropout=0.0)
    args = _args(
        tmp_path, num_train_epochs=2, reduction_max_metric_drop=0.0, reduction_budget_retries=1
    )  # fmt: skip
    trainer = hf_rmtkd.RMTKDTrainer(
        model=str(folder), args=args, train_dataset=random_sentences(128, 0), eval_dataset=random_sentences(32, 1)
    )
    trainer.train()
    callback = trainer.reduction_callback
    assert callback.stopped and callback.history and all(h.get("undone") for h in callback.history)
    assert trainer.model.model.config.hidden_size == 32
    dense = next(m for m in trainer.sentence_model if type(m).__name__ == "Dense")
    assert dense.in_features == 32 and trainer.sentence_model.encode(["good film"]).shape == (1, 16)
