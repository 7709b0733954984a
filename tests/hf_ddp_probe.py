"""Run by tests/test_hf_trainer.py under ``torchrun --nproc_per_node 2`` (gloo, CPU): AlumTrainer and
AdversarialTrainer in Trainer's DDP.  Each rank writes ``OUT/<name>-rank<R>.json`` with a checksum of its
weights, whether the clean pass saw the DDP wrapper, and its log_history."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_hf_trainer import (BertConfig, BertForSequenceClassification, DataCollatorForLanguageModeling,  # noqa: E402
                             DataCollatorWithPadding, cls_dataset, make_args, mlm_dataset, tiny_mlm, WORDS)
from transformers import BertTokenizerFast  # noqa: E402

from alum_pretrain.adversarial import ALUMConfig  # noqa: E402
from alum_pretrain.hf import AdversarialTrainer, AlumTrainer  # noqa: E402


def weights_sum(model) -> list[float]:
    return [float(p.detach().double().sum()) for p in model.parameters()]


def main(out: Path) -> None:
    rank = int(os.environ["RANK"])
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)},
                            do_lower_case=True)
    wrapped = []

    class Spy(AlumTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                wrapped.append(isinstance(model, torch.nn.parallel.DistributedDataParallel))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    model = tiny_mlm(tok)
    init = weights_sum(model)
    trainer = Spy(model=model, args=make_args(out / "mlm", max_steps=3, ddp_backend="gloo"),
                  train_dataset=mlm_dataset(tok), data_collator=DataCollatorForLanguageModeling(tokenizer=tok),
                  alum=ALUMConfig(alpha=1.0))
    trainer.train()
    (out / f"mlm-rank{rank}.json").write_text(json.dumps({
        "init": init, "final": weights_sum(model), "wrapped": wrapped, "world": trainer.accelerator.num_processes,
        "logs": trainer.state.log_history}))
    for method in ("smart", "freelb"):
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, num_labels=3)
        model = BertForSequenceClassification(cfg)
        init = weights_sum(model)
        trainer = AdversarialTrainer(model=model, args=make_args(out / method, max_steps=2, ddp_backend="gloo"),
                                     method=method, train_dataset=cls_dataset(tok),
                                     data_collator=DataCollatorWithPadding(tok))
        trainer.train()
        (out / f"{method}-rank{rank}.json").write_text(json.dumps({
            "init": init, "final": weights_sum(model), "logs": trainer.state.log_history}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
