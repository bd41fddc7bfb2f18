"""RMTKDTrainer's recovery tools on tiny models: representation terms, progressive width, and the trainer's bad inputs."""

import math
import shutil

import pytest
import torch
import transformers as tf
from conftest import tiny_config
from datasets import Dataset, IterableDataset
from testing_utils import (
    hidden_trainer_args,
    labelled_dataset,
    lm_dataset,
    planted_llama,
    tiny_classifier,
    trainer_args,
)

from hf_rmtkd import RMTKDTrainer
from hf_rmtkd.kept_basis import MAPS_FILE, stream_maps
from hf_rmtkd.records import HIDDEN_SITE


_planted, _args, _classifier, _dataset, _lm_data = (
    planted_llama,
    trainer_args,
    tiny_classifier,
    labelled_dataset,
    lm_dataset,
)


def _logged(trainer, key):
    return [log[key] for log in trainer.state.log_history if key in log]


class TestRepresentationTerms:
    def test_terms_vanish_when_the_student_is_the_teacher_through_the_kept_basis(self, tmp_path):
        # A planted stream is sliced exactly; with lr 0 the student stays equal to the teacher seen through Q.
        weights = dict(distillation_hidden_weight=1.0, distillation_attention_weight=1.0, learning_rate=0.0)
        args = hidden_trainer_args(tmp_path / "exact", reduction_target_modules=[], logging_steps=1, **weights)
        trainer = RMTKDTrainer(model=_planted(k=8)[0], args=args, train_dataset=_lm_data())
        trainer.train()
        assert trainer.model.model.config.hidden_size == 8
        hidden, attention = _logged(trainer, "hidden_loss"), _logged(trainer, "attention_loss")
        assert hidden and max(hidden) < 1e-6 and max(attention) < 1e-6
        # Not the planted model: the MP width drops real directions and the hidden term sees it.
        torch.manual_seed(0)
        random = tf.LlamaForCausalLM(_planted()[0].config)
        args = hidden_trainer_args(tmp_path / "random", reduction_target_modules=[], logging_steps=1, **weights)
        trainer = RMTKDTrainer(model=random, args=args, train_dataset=_lm_data())
        trainer.train()
        assert trainer.model.model.config.hidden_size < 32 and max(_logged(trainer, "hidden_loss")) > 1e-3

    def test_the_original_teacher_stays_and_is_seen_through_the_composed_bases(self, tmp_path):
        # Two hidden-width steps, the model as given as the teacher throughout: exact through Q_1 Q_2 on the plant.
        weights = dict(distillation_hidden_weight=1.0, learning_rate=0.0, distillation_teacher="original")
        args = hidden_trainer_args(
            tmp_path, reduction_target_modules=[], logging_steps=1, reduction_hidden_steps=2, **weights
        )
        trainer = RMTKDTrainer(model=_planted(k=8)[0], args=args, train_dataset=_lm_data())
        teacher = trainer.teacher
        assert teacher is not None and teacher.model.config.hidden_size == 32  # there from the start
        trainer.train()
        widths = [h["sites"]["hidden_size"]["k"] for h in trainer.reduction_callback.history]
        assert len(widths) == 2 and widths[-1] == 8 == trainer.model.model.config.hidden_size
        assert trainer.teacher is teacher and teacher.model.config.hidden_size == 32
        hidden = _logged(trainer, "hidden_loss")
        assert hidden and max(hidden) < 1e-6
        with pytest.raises(ValueError, match="set it to 'external'"):
            RMTKDTrainer(model=_planted(k=8)[0], args=args, train_dataset=_lm_data(), teacher_model=teacher)

    def test_encoder_terms_are_logged_and_eval_loss_is_the_task_loss(self, tmp_path):
        args = _args(
            tmp_path,
            max_steps=4,
            reduction_hidden_width=True,
            reduction_schedule="all_at_once",
            reduction_recovery_steps=2,
            distillation_hidden_weight=1.0,
            distillation_attention_weight=0.5,
            logging_steps=1,
        )
        data = _dataset(64)
        trainer = RMTKDTrainer(model=_classifier(), args=args, train_dataset=data, eval_dataset=data)
        plain = tf.Trainer(
            model=_classifier(), args=tf.TrainingArguments(str(tmp_path / "p"), report_to=[], use_cpu=True)
        )
        # Before training, the same weights: eval_loss is the cross-entropy, as for a plain Trainer.
        assert trainer.evaluate(data)["eval_loss"] == pytest.approx(plain.evaluate(data)["eval_loss"], rel=1e-5)
        trainer.train()
        assert trainer.model.model.config.hidden_size < 32
        hidden, attention = _logged(trainer, "hidden_loss"), _logged(trainer, "attention_loss")
        assert len(hidden) >= 2 and all(h > 0 for h in hidden) and all(a >= 0 for a in attention)
        losses = [log for log in trainer.state.log_history if "hidden_loss" in log]
        for log in losses:  # the logged terms make up the loss
            total = 0.7 * log["ce_loss"] + 0.3 * log["kl_loss"] + log["hidden_loss"] + 0.5 * log["attention_loss"]
            assert log["loss"] == pytest.approx(total, rel=1e-3, abs=1e-4)


class TestProgressiveWidth:
    def test_reaches_the_mp_width_in_steps_and_resumes_mid_way(self, tmp_path):
        settings = dict(reduction_hidden_steps=2, reduction_target_modules=[], distillation_hidden_weight=1.0)
        full = RMTKDTrainer(
            model=_planted(k=8)[0], args=hidden_trainer_args(tmp_path / "full", **settings), train_dataset=_lm_data()
        )
        full.train()
        widths = [entry["sites"][HIDDEN_SITE]["k"] for entry in full.reduction_callback.history]
        assert widths == [16, 8]  # 32 * (8 / 32)^(1/2) = 16, then the MP width re-estimated on the narrower model
        record = full.model.config.hidden_width
        assert (record.dim, record.rank, record.widths) == (32, 8, [16, 8])
        assert [m.matrix.shape for m in stream_maps(full.model)] == [(32, 16), (16, 8)]
        full.save_model(tmp_path / "final")
        reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "final")
        assert reloaded.model.config.hidden_size == 8

        class StopAt3(tf.TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                control.should_training_stop = state.global_step >= 3

        cut_args = hidden_trainer_args(tmp_path / "cut", save_strategy="steps", save_steps=2, **settings)
        RMTKDTrainer(model=_planted(k=8)[0], args=cut_args, train_dataset=_lm_data(), callbacks=[StopAt3()]).train()
        checkpoint = tmp_path / "cut" / "checkpoint-2"
        assert (checkpoint / MAPS_FILE).exists()
        resumed = RMTKDTrainer(model=_planted(k=8)[0], args=cut_args, train_dataset=_lm_data())
        resumed.train(resume_from_checkpoint=str(checkpoint))
        assert resumed.model.config.hidden_width.widths == [16, 8]
        a, b = full.model.state_dict(), resumed.model.state_dict()
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)

        # A checkpoint copied without its teacher folder cannot resume the same run: a clear error, not a silent one.
        shutil.rmtree(checkpoint / "rmtkd_teacher")
        again = RMTKDTrainer(model=_planted(k=8)[0], args=cut_args, train_dataset=_lm_data())
        with pytest.raises(ValueError, match="not the teacher it distils from"):
            again.train(resume_from_checkpoint=str(checkpoint))


class TestTrainerInputs:
    def test_iterable_dataset_trains_with_calibration_samples(self, tmp_path):
        rows = _dataset(64).to_list()
        stream = IterableDataset.from_generator(lambda: iter(rows))
        with pytest.raises(ValueError, match="set `calibration_samples`"):
            RMTKDTrainer(
                model=_classifier(), args=_args(tmp_path, max_steps=4, calibration_samples=None), train_dataset=stream
            )
        args = _args(tmp_path, max_steps=4, calibration_samples=32, reduction_schedule="all_at_once")
        trainer = RMTKDTrainer(model=_classifier(), args=args, train_dataset=stream)
        trainer.train()
        assert trainer.model.config.reduced_modules

    def test_misspelt_reduction_metric_fails_before_training(self, tmp_path):
        data = _dataset(32)
        with pytest.raises(ValueError, match="all start with 'eval_'"):
            RMTKDTrainer(
                model=_classifier(),
                args=_args(tmp_path, reduction_max_metric_drop=0.01, reduction_metric="accuracy"),
                train_dataset=data,
                eval_dataset=data,
                compute_metrics=lambda p: {"accuracy": 1.0},
            )
        trainer = RMTKDTrainer(
            model=_classifier(),
            args=_args(tmp_path, reduction_max_metric_drop=0.01, reduction_metric="eval_acuracy"),
            train_dataset=data,
            eval_dataset=data,
            compute_metrics=lambda p: {"accuracy": 1.0},
        )
        with pytest.raises(ValueError, match="'eval_acuracy' is not among the evaluation's metrics"):
            trainer.train()
        assert trainer.state.global_step == 0 and trainer.reduction_callback.history == []


def test_resnet_feature_maps_are_matched_at_block_outputs(tmp_path):
    from hf_rmtkd import ResNetCifarConfig, ResNetCifarForImageClassification

    torch.manual_seed(0)
    model = ResNetCifarForImageClassification(ResNetCifarConfig(depth=8, widths=[4, 8, 16], image_size=8))
    with torch.no_grad():
        states = model(torch.randn(2, 3, 8, 8), output_hidden_states=True).hidden_states
    assert [tuple(s.shape[1:]) for s in states] == [(4, 8, 8), (4, 8, 8), (8, 4, 4), (16, 2, 2)]
    g = torch.Generator().manual_seed(0)
    images = torch.randn(64, 3, 8, 8, generator=g)
    data = Dataset.from_dict(
        {"pixel_values": images.tolist(), "labels": (images[:, 0].mean((1, 2)) > 0).long().tolist()}
    )
    args = _args(
        tmp_path, max_steps=4, reduction_schedule="all_at_once", distillation_hidden_weight=1.0, logging_steps=1
    )
    trainer = RMTKDTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert trainer.model.config.reduced_modules and max(_logged(trainer, "hidden_loss")) > 0


def test_trainer_given_the_original_object_of_a_compressed_model_saves_a_loadable_checkpoint(tmp_path):
    from hf_rmtkd import compress

    original = _classifier()
    batches = [{"input_ids": torch.tensor(labelled_dataset(32, seed=s)["input_ids"])} for s in (1, 2)]
    compressed = compress(original, batches, progress=False)
    first_round = dict(compressed.config.reduced_modules)
    args = _args(tmp_path, max_steps=2, reduction_schedule="none")
    trainer = RMTKDTrainer(model=original, args=args, train_dataset=_dataset(32))
    assert first_round.keys() <= trainer.model.config.reduced_modules.keys()  # the first round is not forgotten
    trainer.train()
    trainer.save_model(tmp_path / "saved")
    reloaded = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved").eval()
    ids = torch.tensor(labelled_dataset(4, seed=9)["input_ids"])
    trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, trainer.model(input_ids=ids).logits, atol=1e-5)


def test_attention_term_is_zero_for_a_copy_despite_attention_dropout(tmp_path):
    # Eager attention returns post-dropout probabilities; the term must compare distributions, not dropped ones.
    import copy

    config = tiny_classifier().config
    config.attention_probs_dropout_prob, config.hidden_dropout_prob = 0.3, 0.0
    torch.manual_seed(0)
    student = tf.BertForSequenceClassification(config)
    teacher = copy.deepcopy(student)
    args = _args(
        tmp_path,
        max_steps=3,
        learning_rate=0.0,
        logging_steps=1,
        reduction_schedule="none",
        distillation_teacher="external",
        distillation_attention_weight=1.0,
    )
    trainer = RMTKDTrainer(model=student, args=args, train_dataset=_dataset(48), teacher_model=teacher)
    implementation = student.config._attn_implementation
    trainer.train()
    assert max(_logged(trainer, "attention_loss")) < 1e-6
    # Eager attention was for training only: the model serves with the implementation it came with.
    assert trainer.model.model.config._attn_implementation == implementation


class TestEverythingFirst:
    def test_all_reductions_before_training_distilled_from_the_original_teacher(self, tmp_path):
        # The recipe of bench_recovery's `*_front` rows: hidden width at step 0, every other site and the token table
        # at step 1, then the whole run distils from the model as given, seen through the kept basis.
        model = tf.BertForSequenceClassification(tiny_config("bert", num_labels=2))
        args = hidden_trainer_args(
            tmp_path,
            reduction_schedule="all_at_once",
            reduction_warmup_steps=0,
            reduction_recovery_steps=1,
            reduction_embeddings=True,
            distillation_teacher="original",
            logging_steps=1,
        )
        trainer = RMTKDTrainer(model=model, args=args, train_dataset=labelled_dataset(64))
        teacher = trainer.teacher
        assert teacher.model.config.hidden_size == 32
        groups = trainer.reduction_groups()
        assert groups[0] == [HIDDEN_SITE] and len(groups) == 2 and "bert.embeddings.word_embeddings" in groups[1]
        trainer.train()
        history = trainer.reduction_callback.history
        assert [entry["step"] for entry in history] == [0, 1]
        width = trainer.model.config.hidden_width.rank
        assert width < 32 and trainer.teacher is teacher and teacher.model.config.hidden_size == 32
        assert set(history[1]["reduced"]) == set(groups[1])
        # Both representation terms ran against the full-width teacher on every step after the reductions.
        hidden, attention = _logged(trainer, "hidden_loss"), _logged(trainer, "attention_loss")
        assert len(hidden) == args.max_steps and all(h > 0 and math.isfinite(h) for h in hidden)
        assert all(a >= 0 and math.isfinite(a) for a in attention)
