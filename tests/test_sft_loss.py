"""The SFT objective equals TRL SFTTrainer's loss in value and gradient on identical batches, with TRL at
its default normalisation (completion tokens of the whole global batch: num_items_in_batch)."""

from __future__ import annotations

import torch

from rank1.core.config import AdapterConfig, DataConfig
from rank1.core.data import arithmetic_rows, to_messages, tokenize_messages
from rank1.core.model import lora_config
from rank1.trainer.sft import SFTObjective


def tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id))


def test_sft_loss_and_gradient_equal_trl_sft_trainer(tokenizer, tmp_path):
    from datasets import Dataset
    from peft import get_peft_model
    from trl import SFTConfig, SFTTrainer

    examples = [tokenize_messages(tokenizer, to_messages(r, "gsm8k", DataConfig(), "row")) for r in arithmetic_rows(6)]
    model = get_peft_model(tiny_llama(tokenizer), lora_config(AdapterConfig()))
    with torch.no_grad():  # B = 0 at init would make the adapter's gradient trivially equal on A
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[],
                     save_strategy="no", max_length=None, per_device_train_batch_size=3)
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"input_ids": i, "labels": l} for i, l in examples]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    objective = SFTObjective(rows_per_step=6, max_sequence_tokens=512)
    micro_batches = [objective.collate(examples[:3], tokenizer.pad_token_id), objective.collate(examples[3:], tokenizer.pad_token_id)]
    norm = objective.normalizer(examples)  # target tokens of the whole global batch
    assert norm == sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro_batches)

    ours = sum(objective.loss(model, mb)[0] for mb in micro_batches) / norm
    ours_grads = torch.autograd.grad(ours, params)
    theirs = sum(trainer.compute_loss(model, dict(mb), num_items_in_batch=torch.tensor(norm)) for mb in micro_batches)
    theirs_grads = torch.autograd.grad(theirs, params)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)  # as the GRPO peer check: TRL fuses the LM head
    assert any(g.abs().max() > 0 for g in ours_grads)
