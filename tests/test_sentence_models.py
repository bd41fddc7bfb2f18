"""sentence-transformers in and out, on a tiny BERT SentenceTransformer (Transformer + Pooling + Normalize)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from testing_utils import random_sentences, tiny_sentence_transformer

import hf_rmtkd  # noqa: F401  (registers the RMTKD Auto classes)
from hf_rmtkd.sentence_models import compress_sentence_transformer, embedding_targets


st = pytest.importorskip("sentence_transformers")


_sentences = random_sentences


@pytest.fixture
def saved_st(tmp_path):
    return tiny_sentence_transformer(tmp_path)


def test_compressed_sentence_transformer_saves_and_loads_with_the_same_modules(saved_st, tmp_path):
    original = st.SentenceTransformer(str(saved_st), device="cpu")
    compressed = compress_sentence_transformer(str(saved_st), _sentences(64, 0), progress=False)
    assert type(compressed[0].model).__name__ == "RMTKDModel" and compressed[0].model.config.reduced_modules
    assert compressed[0].model.num_parameters() < original[0].model.num_parameters()
    probe = _sentences(5, 1)
    expected = compressed.encode(probe, convert_to_tensor=True)
    compressed.save(str(tmp_path / "out"))
    reloaded = st.SentenceTransformer(str(tmp_path / "out"), device="cpu")
    assert [type(m).__name__ for m in reloaded] == [type(m).__name__ for m in original] == [
        "Transformer", "Pooling", "Normalize"
    ]  # fmt: skip
    torch.testing.assert_close(reloaded.encode(probe, convert_to_tensor=True), expected, rtol=0, atol=1e-6)
    assert torch.allclose(expected.norm(dim=1), torch.ones(5), atol=1e-5)  # Normalize kept


def test_hidden_width_and_options_reach_the_embedding_model(saved_st):
    model = st.SentenceTransformer(str(saved_st), device="cpu")
    compress_sentence_transformer(model, _sentences(64, 0), progress=False, hidden_width=True, target_modules=[])
    assert model[0].model.config.hidden_width is not None
    assert model.encode(["good film"]).shape[1] < 32  # the pooled embedding is the narrower stream
    assert model.get_embedding_dimension() == model.encode(["good film"]).shape[1]  # pooling told the new width


def test_loads_with_trust_remote_code_without_hf_rmtkd(saved_st, tmp_path):
    compressed = compress_sentence_transformer(str(saved_st), _sentences(64, 0), progress=False)
    compressed.save(str(tmp_path / "out"))
    expected = compressed.encode(["good film"], convert_to_tensor=True)
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_rmtkd"] = None
        import torch
        from sentence_transformers import SentenceTransformer
        model = SentenceTransformer({str(tmp_path / "out")!r}, device="cpu", trust_remote_code=True)
        got = model.encode(["good film"], convert_to_tensor=True)
        torch.testing.assert_close(got, torch.load({str(tmp_path / "expected.pt")!r}), rtol=0, atol=1e-6)
        print("ST-REMOTE-OK", type(model[0].model).__module__)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ST-REMOTE-OK transformers_modules" in result.stdout


def test_empty_calibration_is_refused(saved_st):
    with pytest.raises(ValueError, match="`sentences` is empty"):
        compress_sentence_transformer(str(saved_st), ["", ""], progress=False)


# -- recovery: embedding distillation through sentence-transformers' trainer --------------------------------------


def _mean_cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


def _quiet_args(tmp_path, epochs=1.0, lr=5e-4):
    return st.SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "distill"), num_train_epochs=epochs, per_device_train_batch_size=16,
        learning_rate=lr, save_strategy="no", report_to="none", disable_tqdm=True, seed=0, use_cpu=True,
    )  # fmt: skip


def test_compress_accepts_a_sentence_transformer_and_its_folder(saved_st):
    from_folder = hf_rmtkd.compress(str(saved_st), _sentences(64, 0), progress=False)
    assert isinstance(from_folder, st.SentenceTransformer)
    model = st.SentenceTransformer(str(saved_st), device="cpu")
    same, report = hf_rmtkd.compress(model, _sentences(64, 0), progress=False, return_report=True)
    assert same is model and len(report) and type(model[0].model).__name__ == "RMTKDModel"
    with pytest.raises(TypeError, match="raw sentences"):
        hf_rmtkd.compress(str(saved_st), [{"input_ids": torch.ones(2, 3, dtype=torch.long)}], progress=False)


def test_targets_are_the_teachers_embeddings_at_the_same_width(saved_st):
    teacher = st.SentenceTransformer(str(saved_st), device="cpu")
    probe = _sentences(8, 3)
    targets = embedding_targets(teacher, teacher, probe)
    torch.testing.assert_close(targets, teacher.encode(probe, convert_to_tensor=True), rtol=0, atol=0)


def test_targets_go_through_the_kept_basis_when_the_width_was_reduced(saved_st):
    teacher = st.SentenceTransformer(str(saved_st), device="cpu")
    student = compress_sentence_transformer(
        str(saved_st), _sentences(128, 0), progress=False, hidden_width=True, target_modules=[]
    )
    probe = _sentences(32, 4)
    targets = embedding_targets(teacher, student, probe)
    embeddings = student.encode(probe, convert_to_tensor=True)
    assert targets.shape == embeddings.shape and embeddings.shape[1] < 32
    torch.testing.assert_close(targets.norm(dim=1), torch.ones(32), rtol=0, atol=1e-5)  # renormalised
    # The kept basis, not any basis: a random orthonormal map of the same shape lands far from the student.
    q, _ = torch.linalg.qr(torch.randn(32, embeddings.shape[1], generator=torch.Generator().manual_seed(0)))
    random = torch.nn.functional.normalize(teacher.encode(probe, convert_to_tensor=True) @ q, dim=-1)
    assert _mean_cosine(embeddings, targets) > 0.8 > _mean_cosine(embeddings, random) + 0.3


def _missed_share(student, teacher, sentences):
    """Mean squared distance of the student's embeddings from the targets, over the targets' own spread."""
    targets = embedding_targets(teacher, student, sentences)
    embeddings = student.encode(sentences, convert_to_tensor=True)
    return float(((embeddings - targets) ** 2).sum(1).mean() / ((targets - targets.mean(0)) ** 2).sum(1).mean())


def test_distillation_brings_the_student_back_towards_the_teacher_and_saves(saved_st, tmp_path):
    # Dropout off: on a 32-wide model, 48 steps with dropout's noise move the student as much as the loss does.
    teacher = st.SentenceTransformer(str(saved_st), device="cpu")
    teacher[0].model.config.hidden_dropout_prob = teacher[0].model.config.attention_probs_dropout_prob = 0.0
    teacher[0].model.save_pretrained(str(saved_st))
    teacher = st.SentenceTransformer(str(saved_st), device="cpu")
    student = compress_sentence_transformer(
        str(saved_st), _sentences(128, 0), progress=False, hidden_width=True, target_modules=[]
    )
    held_out = _sentences(64, 5)
    before = _missed_share(student, teacher, held_out)
    trained = hf_rmtkd.distill_sentence_transformer(
        student, teacher, _sentences(256, 6), args=_quiet_args(tmp_path, epochs=3), distance="cosine"
    )
    assert trained is student
    after = _missed_share(student, teacher, held_out)
    assert after < 0.8 * before, (before, after)
    expected = student.encode(held_out, convert_to_tensor=True)
    student.save(str(tmp_path / "recovered"))
    reloaded = st.SentenceTransformer(str(tmp_path / "recovered"), device="cpu")
    torch.testing.assert_close(reloaded.encode(held_out, convert_to_tensor=True), expected, rtol=0, atol=1e-5)


def test_distillation_refuses_bad_input(saved_st, tmp_path):
    teacher = st.SentenceTransformer(str(saved_st), device="cpu")
    student = st.SentenceTransformer(str(saved_st), device="cpu")
    with pytest.raises(ValueError, match="`distance` must be one of"):
        hf_rmtkd.distill_sentence_transformer(student, teacher, ["good film"], distance="dot")
    with pytest.raises(ValueError, match="`sentences` is empty"):
        hf_rmtkd.distill_sentence_transformer(student, teacher, ["", ""], args=_quiet_args(tmp_path))
    narrow = compress_sentence_transformer(
        str(saved_st), _sentences(128, 0), progress=False, hidden_width=True, target_modules=[]
    )
    narrow.save(str(tmp_path / "narrow"))
    reloaded = st.SentenceTransformer(str(tmp_path / "narrow"), device="cpu")
    with pytest.raises(ValueError, match="records no hidden-width reduction"):
        embedding_targets(teacher, reloaded, ["good film"])
