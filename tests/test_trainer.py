"""RMTKDTrainer on tiny random configs: loss, scheduled reductions, gradient accumulation, resume, stop rules."""

import dataclasses
import inspect

import pytest
import torch
import transformers as tf
from conftest import tiny_config
from datasets import Dataset
from testing_utils import labelled_dataset, tiny_classifier, trainer_args

from hf_rmtkd import RMTKDTrainer, RMTKDTrainingArguments
from hf_rmtkd.schedule import layer_groups, reduction_steps
from hf_rmtkd.sites import find_sites


_classifier, _dataset, _args = tiny_classifier, labelled_dataset, trainer_args


class TestTraining:
    def test_loss_goes_down_and_parameters_drop_at_each_reduction(self, tmp_path):
        trainer = RMTKDTrainer(model=_classifier(), args=_args(tmp_path, num_train_epochs=4), train_dataset=_dataset())
        start = trainer.model.num_parameters()
        trainer.train()
        history = trainer.reduction_callback.history
        assert [h["index"] for h in history] == [0, 1]  # one group per layer, shallow to deep
        assert all("encoder.layer.0." in n for n in history[0]["reduced"])
        assert start > history[0]["params_after"] > history[1]["params_after"] == trainer.model.num_parameters()
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        assert losses[-1] < losses[0]
        logged = [log for log in trainer.state.log_history if "rmtkd/params_after" in log]
        assert len(logged) == 2 and "rmtkd/bert.encoder.layer.0.output.dense/k" in logged[0]
        assert {"ce_loss", "kl_loss"} <= set(next(log for log in trainer.state.log_history if "loss" in log))
        assert list((tmp_path / "spectra" / "reduction_00").glob("spectrum_*.png"))

    def test_final_model_reloads_with_auto_class(self, tmp_path):
        trainer = RMTKDTrainer(
            model=_classifier(), args=_args(tmp_path, num_train_epochs=1), train_dataset=_dataset(64)
        )
        trainer.train()
        trainer.save_model(tmp_path / "final")
        reloaded = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "final")
        batch = {"input_ids": torch.randint(5, 99, (3, 12)), "attention_mask": torch.ones(3, 12, dtype=torch.long)}
        trainer.model.eval()
        with torch.no_grad():
            assert torch.allclose(reloaded(**batch).logits, trainer.model(**batch).logits, atol=1e-5)
        assert reloaded.num_parameters() == trainer.model.num_parameters()

    def test_self_teacher_exists_only_after_a_reduction(self, tmp_path):
        args = _args(tmp_path, max_steps=4, reduction_warmup_steps=2, reduction_recovery_steps=1)
        trainer = RMTKDTrainer(model=_classifier(), args=args, train_dataset=_dataset(64))
        assert trainer.teacher is None
        trainer.train()
        assert trainer.teacher is not None and not trainer.teacher.training
        assert all(not p.requires_grad for p in trainer.teacher.parameters())
        teacher_ids = {id(p) for p in trainer.teacher.parameters()}
        assert not teacher_ids & {id(p) for p in trainer.model.parameters()}

    def test_schedule_none_distils_without_reducing(self, tmp_path):
        # After `compress`, distillation only: the student learns, keeps its shapes, and moves towards the teacher.
        teacher = _classifier(seed=1).eval()
        with torch.no_grad():
            teacher.classifier.weight.mul_(30.0)  # confident, so the student has something to learn
        args = _args(tmp_path, reduction_schedule="none", distillation_teacher="external", distillation_alpha=0.0)
        trainer = RMTKDTrainer(model=_classifier(), args=args, train_dataset=_dataset(64), teacher_model=teacher)
        start = trainer.model.num_parameters()
        batch = {"input_ids": torch.randint(5, 99, (8, 12)), "attention_mask": torch.ones(8, 12, dtype=torch.long)}

        def gap():
            trainer.model.eval()
            with torch.no_grad():
                return (trainer.model(**batch).logits - teacher(**batch).logits).abs().mean().item()

        before = gap()
        trainer.train()
        assert trainer.reduction_callback.history == [] and trainer.model.num_parameters() == start
        assert gap() < 0.8 * before  # alpha=0: only the KL to the teacher moves it
        assert trainer.model.config.reduced_modules == {}

    def test_gradient_accumulation_equals_full_batch(self, tmp_path):
        # Token labels with uneven padding: only a loss normalised by the global item count gives equal updates.
        config = tiny_config("bert", num_labels=3)
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(5, 99, (16, 10), generator=g)
        labels = torch.randint(0, 3, (16, 10), generator=g)
        labels[torch.arange(16)[:, None] < torch.arange(10)[None, :] // 1 - torch.arange(16)[:, None] % 5] = -100
        data = Dataset.from_dict(
            {"input_ids": ids.tolist(), "attention_mask": [[1] * 10] * 16, "labels": labels.tolist()}
        )
        teacher = tf.BertForTokenClassification(config).eval()
        results = []
        for batch, accumulation in ((16, 1), (4, 4)):
            torch.manual_seed(0)
            model = tf.BertForTokenClassification(config)
            args = _args(
                tmp_path / f"ga{accumulation}",
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=accumulation,
                max_steps=2,
                distillation_teacher="external",
                reduction_warmup_steps=100,
                optim="sgd",
                learning_rate=0.5,
            )
            trainer = RMTKDTrainer(model=model, args=args, train_dataset=data, teacher_model=teacher)
            trainer.train()
            results.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
        assert all(torch.allclose(results[0][k], results[1][k], atol=1e-5) for k in results[0])
        assert not torch.equal(results[0]["model.classifier.weight"], teacher.classifier.weight)

    def test_resumed_run_matches_uninterrupted(self, tmp_path):
        common = dict(
            max_steps=8,
            reduction_warmup_steps=1,
            reduction_recovery_steps=3,
            save_strategy="steps",
            save_steps=4,
            learning_rate=1e-3,
        )
        full = RMTKDTrainer(model=_classifier(), args=_args(tmp_path / "full", **common), train_dataset=_dataset())
        full.train()

        class StopAt5(tf.TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                control.should_training_stop = state.global_step >= 5

        cut = RMTKDTrainer(
            model=_classifier(),
            args=_args(tmp_path / "cut", **common),
            train_dataset=_dataset(),
            callbacks=[StopAt5()],
        )
        cut.train()
        # Reductions before steps 2 and 5; checkpoint-4 holds the first reduction, its teacher and the schedule.
        assert len(cut.reduction_callback.history) == 2
        resumed = RMTKDTrainer(model=_classifier(), args=_args(tmp_path / "cut", **common), train_dataset=_dataset())
        resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-4"))
        assert resumed.reduction_callback.completed == full.reduction_callback.completed == 2
        assert [h["step"] for h in resumed.reduction_callback.history] == [1, 4]
        assert resumed.model.config.reduced_modules.keys() == full.model.config.reduced_modules.keys()
        a, b = full.model.state_dict(), resumed.model.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


class TestStopRules:
    def test_target_parameter_count_stops_the_schedule(self, tmp_path):
        trainer = RMTKDTrainer(
            model=_classifier(), args=_args(tmp_path, reduction_target_params=10**9), train_dataset=_dataset(64)
        )
        start = trainer.model.num_parameters()
        trainer.train()
        assert trainer.reduction_callback.history == [] and trainer.reduction_callback.stopped
        assert trainer.model.num_parameters() == start

    @staticmethod
    def _budget_trainer(tmp_path, budget, retries, max_steps=3):
        # The metric is the parameter count itself: every reduction "drops" it by what it removes, deterministically.
        args = _args(
            tmp_path,
            max_steps=max_steps,
            reduction_warmup_steps=0,
            reduction_recovery_steps=1,
            reduction_max_metric_drop=budget,
            reduction_metric="eval_params",
            reduction_budget_retries=retries,
        )
        data = _dataset(64)
        trainer = RMTKDTrainer(
            model=_classifier(),
            args=args,
            train_dataset=data,
            eval_dataset=data,
            compute_metrics=lambda prediction: {"params": float(trainer.model.num_parameters())},
        )
        return trainer

    def test_metric_budget_undoes_a_reduction_that_breaks_it(self, tmp_path, caplog):
        trainer = self._budget_trainer(tmp_path, budget=5.0, retries=0)
        start = trainer.model.num_parameters()
        with caplog.at_level("WARNING", logger="hf_rmtkd"):
            trainer.train()
        history = trainer.reduction_callback.history
        # The first reduction broke the budget: undone before the second, and the schedule stopped.
        assert len(history) == 1 and history[0]["undone"] is True and trainer.reduction_callback.stopped
        assert trainer.model.num_parameters() == start and trainer.model.config.reduced_modules == {}
        assert any("rmtkd/undone_reduction" in log for log in trainer.state.log_history)
        # Said loudly, with the figures, and in the final summary.
        assert "reduction schedule stopped after 0 of 2 reductions" in caplog.text
        assert "summary: 0 of 2 scheduled reductions kept" in caplog.text and "eval_params" in caplog.text

    def test_metric_budget_retries_with_gentler_ranks(self, tmp_path):
        untouched = self._budget_trainer(tmp_path / "a", budget=10**9, retries=0, max_steps=1)
        untouched.train()
        mp_cost = untouched.reduction_callback.history[0]["params_before"] - untouched.model.num_parameters()
        # A budget the MP ranks break by far, and ranks halfway back to full width meet.
        trainer = self._budget_trainer(tmp_path / "b", budget=0.5 * mp_cost, retries=2)
        trainer.train()
        first, second = trainer.reduction_callback.history[:2]
        assert first["index"] == second["index"] == 0 and first["undone"] and first["relaxation"] == 0.0
        assert second["relaxation"] == 0.5 and not second.get("undone") and second["try"] == 1
        kept = second["params_before"] - second["params_after"]
        assert 0 < kept <= 0.5 * mp_cost
        for name, site in second["sites"].items():  # every rank moved halfway back to the full width, at least
            assert site["k"] >= first["sites"][name]["k"] + (site["d"] - first["sites"][name]["k"]) / 2
        logs = [log for log in trainer.state.log_history if "rmtkd/budget_try" in log]
        assert logs[0]["rmtkd/relaxation"] == 0.5

    def test_min_rank_ratio_floors_every_rank(self, tmp_path):
        args = _args(tmp_path, max_steps=2, reduction_schedule="all_at_once", reduction_min_rank_ratio=0.3)
        trainer = RMTKDTrainer(model=_classifier(), args=args, train_dataset=_dataset(64))
        trainer.train()
        assert trainer.model.config.reduced_modules, "nothing was reduced: the floor was not exercised"
        for record in trainer.model.config.reduced_modules.values():
            assert record.rank >= 0.3 * record.dim


class TestBadInput:
    def test_dataset_without_labels_fails_at_construction(self, tmp_path):
        data = _dataset(8).remove_columns("labels")
        with pytest.raises(ValueError, match="no labels"):
            RMTKDTrainer(model=_classifier(), args=_args(tmp_path), train_dataset=data)

    def test_model_without_logits_fails_at_construction(self, tmp_path):
        with pytest.raises(ValueError, match="BertModel takes no labels and returns no `logits`"):
            RMTKDTrainer(model=tf.BertModel(tiny_config("bert")), args=_args(tmp_path), train_dataset=_dataset(16))

    def test_target_modules_matching_nothing_lists_close_matches(self, tmp_path):
        with pytest.raises(ValueError, match="Close matches.*query"):
            RMTKDTrainer(
                model=_classifier(), args=_args(tmp_path, reduction_target_modules=["quer"]), train_dataset=_dataset(8)
            )

    def test_metric_budget_without_eval_dataset_fails_at_construction(self, tmp_path):
        with pytest.raises(ValueError, match="needs an `eval_dataset`"):
            RMTKDTrainer(
                model=_classifier(), args=_args(tmp_path, reduction_max_metric_drop=0.01), train_dataset=_dataset(8)
            )

    def test_metric_budget_on_accuracy_without_compute_metrics_fails(self, tmp_path):
        args = _args(tmp_path, reduction_max_metric_drop=0.01, reduction_metric="eval_accuracy")
        with pytest.raises(ValueError, match="needs `compute_metrics`"):
            RMTKDTrainer(model=_classifier(), args=args, train_dataset=_dataset(8), eval_dataset=_dataset(8))

    def test_external_teacher_required(self, tmp_path):
        with pytest.raises(ValueError, match="needs a `teacher_model`"):
            RMTKDTrainer(
                model=_classifier(), args=_args(tmp_path, distillation_teacher="external"), train_dataset=_dataset(8)
            )


class TestArguments:
    @pytest.mark.parametrize(
        "field,value",
        [
            ("distillation_alpha", 1.2),
            ("distillation_temperature", 0.0),
            ("distillation_teacher", "ema"),
            ("reduction_schedule", "random"),
            ("reduction_recovery_steps", 0),
            ("reduction_span", 0.0),
            ("reduction_warmup_steps", -1),
            ("calibration_fraction", 0.0),
            ("calibration_samples", 0),
            ("calibration_max_tokens", 1),
            ("reduction_estimator", "median"),
            ("reduction_tau", 1.0),
            ("reduction_false_alarm", 0.2),
            ("reduction_ffn_method", "fold"),
            ("reduction_min_rank_ratio", 1.0),
            ("reduction_max_metric_drop", -0.1),
            ("reduction_target_params", 0),
            ("distillation_hidden_weight", -1.0),
            ("distillation_attention_weight", -0.5),
            ("reduction_hidden_steps", 0),
            ("reduction_budget_retries", -1),
        ],
    )
    def test_bad_value_names_field_and_value(self, tmp_path, field, value):
        with pytest.raises(
            ValueError, match=f"`{field}`.*{value!r}" if isinstance(value, str) else f"`{field}`.*{value}"
        ):
            RMTKDTrainingArguments(output_dir=str(tmp_path), **{field: value})

    def test_representation_terms_default_on_with_the_hidden_width_only(self, tmp_path):
        plain = RMTKDTrainingArguments(output_dir=str(tmp_path))
        assert plain.term_weight("hidden") == plain.term_weight("attention") == 0.0
        hidden = dataclasses.replace(plain, reduction_hidden_width=True)  # resolved on use, not at construction
        assert hidden.term_weight("hidden") == hidden.term_weight("attention") == 1.0
        chosen = RMTKDTrainingArguments(
            output_dir=str(tmp_path), reduction_hidden_width=True, distillation_attention_weight=0.0
        )
        assert chosen.term_weight("hidden") == 1.0 and chosen.term_weight("attention") == 0.0

    def test_every_field_is_documented(self):
        own = [
            f.name
            for f in dataclasses.fields(RMTKDTrainingArguments)
            if f.name not in {g.name for g in dataclasses.fields(tf.TrainingArguments)}
        ]
        doc = inspect.getdoc(RMTKDTrainingArguments)
        assert len(own) == 32
        for name in own:
            assert f"{name} (`" in doc, name
            assert dataclasses.fields(RMTKDTrainingArguments)[
                [f.name for f in dataclasses.fields(RMTKDTrainingArguments)].index(name)
            ].metadata["help"]

    def test_parsed_from_the_command_line(self, tmp_path):
        (args,) = tf.HfArgumentParser(RMTKDTrainingArguments).parse_args_into_dataclasses(
            [
                "--output_dir",
                str(tmp_path),
                "--distillation_alpha",
                "0.5",
                "--reduction_target_modules",
                "query",
                "value",
            ]
        )
        assert args.distillation_alpha == 0.5 and args.reduction_target_modules == ["query", "value"]


class TestSchedule:
    def test_layerwise_groups_shallow_to_deep(self):
        groups = layer_groups(find_sites(_classifier()), "layerwise")
        assert (
            len(groups) == 2 and all(".layer.0." in n for n in groups[0]) and all(".layer.1." in n for n in groups[1])
        )
        assert len(layer_groups(find_sites(_classifier()), "all_at_once")) == 1

    def test_default_steps_spread_over_the_span(self):
        assert reduction_steps(3, 100) == [0, 16, 32]
        assert reduction_steps(2, 100, warmup=10, recovery=20) == [10, 30]
        assert reduction_steps(3, 25, warmup=10, recovery=10) == [10, 20]


def test_causal_lm_distils_per_token(tmp_path):
    config = tiny_config("gpt2")
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 99, (32, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[::2, 7:] = 0  # padded tails, masked out of CE and KL through -100 labels
    labels = ids.masked_fill(mask == 0, -100)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()})
    args = _args(
        tmp_path, max_steps=6, reduction_warmup_steps=1, reduction_recovery_steps=2, per_device_train_batch_size=8
    )
    trainer = RMTKDTrainer(model=model, args=args, train_dataset=data)
    start = trainer.model.num_parameters()
    trainer.train()
    assert type(trainer.model).__name__ == "RMTKDForCausalLM"
    assert trainer.model.num_parameters() < start
    kl = [log["kl_loss"] for log in trainer.state.log_history if "kl_loss" in log]
    assert kl and all(value >= 0 for value in kl) and max(kl) > 0
    generated = trainer.model.generate(ids[:1, :4], attention_mask=mask[:1, :4], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7)
