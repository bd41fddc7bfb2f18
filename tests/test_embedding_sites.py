"""The input token table as a reduction site: a planted low-rank table, its exact output error, the checkpoint format,
tied heads refused, and the trainer's last scheduled reduction."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from conftest import tiny_config
from testing_utils import hidden_trainer_args, labelled_dataset, trainer_args

import hf_rmtkd
from hf_rmtkd import RMTKDTrainer, RMTKDTrainingArguments, compress
from hf_rmtkd.layers import LowRankEmbedding
from hf_rmtkd.records import EmbeddingRecord


TABLE = "bert.embeddings.word_embeddings"
VOCAB, RANK = 4000, 6


def planted_classifier(noise=0.05, seed=0):
    """A tiny BERT classifier whose token table is rank `RANK` plus isotropic noise (`VOCAB` rows, width 32)."""
    config = tiny_config("bert", num_labels=2)
    config.vocab_size = VOCAB
    torch.manual_seed(seed)
    model = tf.BertForSequenceClassification(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    d = config.hidden_size
    table = torch.randn(VOCAB, RANK, generator=g) @ torch.randn(RANK, d, generator=g)
    table += noise * torch.randn(VOCAB, d, generator=g)
    table[config.pad_token_id] = 0  # as in a trained table
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.copy_(table)
    return model


def spread_batches(n=40, seq=50, seed=3):
    """Token ids spread over the whole vocabulary, so the calibration sees about as many distinct rows as tokens."""
    ids = torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))
    return [
        {"input_ids": ids[i : i + 8], "attention_mask": torch.ones(8, seq, dtype=torch.long)} for i in range(0, n, 8)
    ]


class TestEmbeddingSite:
    def test_planted_rank_is_found_and_the_output_error_is_exact(self):
        model = planted_classifier()
        batches = spread_batches()
        ids = torch.cat([b["input_ids"] for b in batches])
        with torch.no_grad():
            before = model.bert.embeddings.word_embeddings(ids).reshape(-1, 32).double()
        out, report = compress(
            model, batches, embeddings=True, max_output_error=0.5, return_report=True, progress=False
        )
        site = report[TABLE]
        assert site.kind == "embedding" and site.signal_rank == RANK and site.rank == RANK
        table = out.model.bert.embeddings.word_embeddings
        assert isinstance(table, LowRankEmbedding) and table.rank == RANK
        assert table.down.padding_idx == 0 and torch.all(table.down.weight[0] == 0)
        record = out.config.reduced_modules[TABLE]
        assert isinstance(record, EmbeddingRecord)
        assert (record.in_features, record.out_features, record.rank, record.bias) == (VOCAB, 32, RANK, True)
        with torch.no_grad():
            after = table(ids).reshape(-1, 32).double()
        measured = ((before - after) ** 2).sum() / ((before - before.mean(0)) ** 2).sum()
        assert 0 < record.output_error < 0.01
        assert float(measured) == pytest.approx(record.output_error, rel=1e-3)
        assert sum(p.numel() for p in table.parameters()) == RANK * (VOCAB + 32) + 32

    def test_model_card_row(self):
        from hf_rmtkd.model_card import reduced_module_rows

        out = compress(planted_classifier(), spread_batches(), embeddings=True, progress=False)
        row = next(r for r in reduced_module_rows(out.config) if r["name"] == TABLE)
        assert (row["kind"], row["dim"], row["rank"], row["form"]) == ("embedding", 32, RANK, "factorised table")

    def test_left_alone_unless_asked(self):
        out = compress(planted_classifier(), spread_batches(), progress=False)
        assert isinstance(out.model.bert.embeddings.word_embeddings, torch.nn.Embedding)
        assert TABLE not in out.config.reduced_modules

    def test_named_in_target_modules(self):
        out = compress(planted_classifier(), spread_batches(), target_modules=["word_embeddings"], progress=False)
        assert list(out.config.reduced_modules) == [TABLE]
        assert out.config.reduced_modules[TABLE].kind == "embedding"

    def test_saves_and_reloads_with_auto_classes(self, tmp_path):
        batches = spread_batches()
        out = compress(planted_classifier(), batches, embeddings=True, progress=False)
        out.save_pretrained(tmp_path)
        saved = json.loads((tmp_path / "config.json").read_text())
        assert saved["reduced_modules"][TABLE]["kind"] == "embedding"
        back = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
        assert isinstance(back.model.bert.embeddings.word_embeddings, LowRankEmbedding)
        with torch.no_grad():
            torch.testing.assert_close(back(**batches[0]).logits, out(**batches[0]).logits)

    def test_checkpoint_whose_rank_disagrees_with_its_config_raises(self, tmp_path):
        out = compress(planted_classifier(), spread_batches(), embeddings=True, progress=False)
        out.save_pretrained(tmp_path)
        config = json.loads((tmp_path / "config.json").read_text())
        config["reduced_modules"][TABLE]["rank"] = RANK + 2
        config.pop("weights_sha256", None)
        (tmp_path / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match="word_embeddings"):
            tf.AutoModelForSequenceClassification.from_pretrained(tmp_path)

    def test_second_compression_refactorises_instead_of_nesting(self):
        batches = spread_batches()
        out = compress(planted_classifier(), batches, embeddings=True, progress=False)
        again = compress(
            out, batches, target_modules=["word_embeddings"], estimator="quantile", tau=0.99, progress=False
        )
        table = again.model.bert.embeddings.word_embeddings
        assert isinstance(table, LowRankEmbedding) and isinstance(table.down, torch.nn.Embedding)
        record = again.config.reduced_modules[TABLE]
        assert (record.in_features, record.out_features) == (VOCAB, 32) and record.rank == table.rank <= RANK

    def test_after_the_hidden_width(self, tmp_path):
        batches = spread_batches()
        out = compress(planted_classifier(), batches, hidden_width=True, embeddings=True, progress=False)
        width = out.config.hidden_width.rank
        record = out.config.reduced_modules[TABLE]
        assert width < 32 and record.out_features == width and record.rank < width
        out.save_pretrained(tmp_path)
        back = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
        with torch.no_grad():
            torch.testing.assert_close(back(**batches[0]).logits, out(**batches[0]).logits)

    def test_tied_table_is_refused(self):
        config = tiny_config("llama")
        config.tie_word_embeddings = True
        model = tf.LlamaForCausalLM(config)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        batches = [{"input_ids": torch.randint(2, 99, (2, 8))}]
        with pytest.raises(ValueError, match="tied to the output head"):
            compress(model, batches, embeddings=True, progress=False)
        with pytest.raises(ValueError, match="tied to the output head"):
            compress(model, batches, target_modules=["embed_tokens"], progress=False)
        assert isinstance(model.model.embed_tokens, torch.nn.Embedding)


class TestTrainerEmbeddings:
    def test_table_is_the_last_scheduled_reduction(self, tmp_path):
        model = tf.BertForSequenceClassification(tiny_config("bert", num_labels=2))
        args = hidden_trainer_args(tmp_path, reduction_embeddings=True, max_steps=14)
        trainer = RMTKDTrainer(model=model, args=args, train_dataset=labelled_dataset(64))
        groups = trainer.reduction_groups()
        assert groups[0] == ["hidden_size"] and groups[-1] == [TABLE]
        trainer.train()
        table = trainer.model.model.bert.embeddings.word_embeddings
        record = trainer.model.config.reduced_modules[TABLE]
        assert isinstance(table, LowRankEmbedding) and table.rank == record.rank
        assert record.out_features == trainer.model.config.hidden_width.rank
        trainer.save_model()
        back = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path)
        assert isinstance(back.model.bert.embeddings.word_embeddings, LowRankEmbedding)

    def test_with_target_modules_is_refused(self, tmp_path):
        with pytest.raises(ValueError, match="reduction_embeddings"):
            trainer_args(tmp_path, reduction_embeddings=True, reduction_target_modules=["query"])

    def test_default_is_off(self):
        assert RMTKDTrainingArguments(output_dir="x").reduction_embeddings is False
        assert hf_rmtkd.LowRankEmbedding is LowRankEmbedding


class TestResizeTokenEmbeddings:
    """Tokens added after compression (special tokens, a chat template): the checkpoint must still reload."""

    def _roundtrip(self, model, tmp_path, auto_class):
        model.save_pretrained(tmp_path)
        return auto_class.from_pretrained(tmp_path).eval()

    def test_plain_table_grows_and_reloads(self, tmp_path):
        compressed = compress(planted_classifier(), spread_batches(), progress=False)
        ids = spread_batches()[0]
        before = compressed(**ids).logits
        table = compressed.resize_token_embeddings(VOCAB + 5)
        assert isinstance(table, torch.nn.Embedding) and table.num_embeddings == VOCAB + 5
        assert compressed.config.base_config["vocab_size"] == VOCAB + 5
        back = self._roundtrip(compressed, tmp_path, tf.AutoModelForSequenceClassification)
        assert back.get_input_embeddings().num_embeddings == VOCAB + 5
        torch.testing.assert_close(back(**ids).logits, before)
        added = {**ids, "input_ids": torch.full_like(ids["input_ids"], VOCAB + 4)}
        torch.testing.assert_close(back(**added).logits, compressed(**added).logits)

    def test_factorised_table_grows_in_its_rank_space_and_reloads(self, tmp_path):
        compressed = compress(planted_classifier(), spread_batches(), embeddings=True, progress=False)
        table = compressed.get_input_embeddings()
        old_rows = table.down.weight.detach().clone()
        ids = spread_batches()[0]
        before = compressed(**ids).logits
        assert compressed.resize_token_embeddings(VOCAB + 7) is table
        assert table.down.weight.shape == (VOCAB + 7, RANK) and table.num_embeddings == VOCAB + 7
        assert compressed.config.reduced_modules[TABLE].in_features == VOCAB + 7
        torch.testing.assert_close(table.down.weight[:VOCAB], old_rows)
        # Mean resizing: the added rows sit near the mean of the old ones (transformers samples with 1e-9 covariance).
        torch.testing.assert_close(table.down.weight[VOCAB:], old_rows.mean(0).expand(7, -1), atol=1e-3, rtol=0)
        assert table.padding_idx == table.down.padding_idx == compressed.model.config.pad_token_id
        back = self._roundtrip(compressed, tmp_path, tf.AutoModelForSequenceClassification)
        torch.testing.assert_close(back(**ids).logits, before)
        compressed.resize_token_embeddings(VOCAB - 10)  # shrinking drops rows from the end, as for a plain table
        assert table.down.weight.shape == (VOCAB - 10, RANK)
        back = self._roundtrip(compressed, tmp_path / "small", tf.AutoModelForSequenceClassification)
        assert back.get_input_embeddings().num_embeddings == VOCAB - 10

    def test_untied_lm_head_follows_a_factorised_table(self, tmp_path):
        config = tiny_config("llama")
        config.tie_word_embeddings = False
        torch.manual_seed(0)
        model = tf.LlamaForCausalLM(config).eval()
        batches = [{"input_ids": torch.randint(0, config.vocab_size, (4, 16))} for _ in range(4)]
        compressed = compress(model, batches, embeddings=True, progress=False)
        vocab = config.vocab_size + 3
        compressed.resize_token_embeddings(vocab)
        assert compressed.model.get_output_embeddings().weight.shape[0] == vocab
        back = self._roundtrip(compressed, tmp_path, tf.AutoModelForCausalLM)
        ids = torch.tensor([[1, 2, vocab - 1]])
        assert back(input_ids=ids).logits.shape[-1] == vocab
        torch.testing.assert_close(back(input_ids=ids).logits, compressed(input_ids=ids).logits)
