"""Runs one scheduled reduction with RMTKDTrainer and writes ranks and reduced weights; launched 1- or 2-process.

Usage: python ddp_reduction.py OUT_DIR  (or under torchrun / accelerate launch). Learning rate 0 and a reduction
before the first step: the weights after training are exactly the reduced weights, comparable across launches.
"""

import json
import os
import sys
from pathlib import Path

import torch
import transformers as tf
from datasets import Dataset

from hf_rmtkd import RMTKDTrainer, RMTKDTrainingArguments


def main(out: Path) -> None:
    config = tf.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 99, (64, 12), generator=g)
    data = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * 12] * 64, "labels": (ids[:, 1] > 52).long().tolist()}
    )
    args = RMTKDTrainingArguments(
        # One folder per rank: what each process writes (card, plots) shows up separately.
        output_dir=str(out / f"run_rank{os.environ.get('RANK', '0')}"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        max_steps=1,
        learning_rate=0.0,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        reduction_schedule="all_at_once",
        calibration_samples=64,
        ddp_find_unused_parameters=False,
        ddp_timeout=120,
        # gloo only when launched distributed: a backend in a 1-process run makes accelerate expect a process group.
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        dataloader_num_workers=0,
        seed=0,
        use_cpu=True,
    )
    trainer = RMTKDTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    trainer.create_model_card(model_name="ddp-job")
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    ranks = {name: record.rank for name, record in trainer.model.config.reduced_modules.items()}
    weights = {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}
    torch.save(weights, out / f"weights_world{world}_rank{rank}.pt")
    (out / f"ranks_world{world}_rank{rank}.json").write_text(
        json.dumps({"world_size": world, "ranks": ranks, "history": trainer.reduction_callback.history})
    )
    print(f"world_size={world} rank={rank} reduced={len(ranks)}", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
