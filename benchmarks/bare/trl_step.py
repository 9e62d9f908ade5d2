"""The TRL step by hand: trl.SFTTrainer on pre-tokenised rows (input_ids + completion_mask, completion-only loss),
grad_accum micro-batches of one sample, SGD, two optimizer steps, as the bundled trl-sft-ga3 case. The gradient is
read the way a person checking by hand would: after accumulation, before the optimizer step. No stepdiff.

    <trl env>/bin/python benchmarks/bare/trl_step.py [--grad-accum 3]
"""

from __future__ import annotations

import os
import tempfile

import common


def main() -> None:
    args = common.parse()
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    import datasets
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    vocab = {("<pad>" if i == 0 else "<eos>" if i == 1 else "<bos>" if i == 2 else f"w{i}"): i
             for i in range(args.vocab)}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                  unk_token="<pad>")
    steps = 2
    rows = []
    for _ in range(steps):
        for prompt, response in common.samples(args):
            rows.append({"input_ids": prompt + response, "completion_mask": [0] * len(prompt) + [1] * len(response)})
    cfg = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=1,
                    gradient_accumulation_steps=args.grad_accum, max_steps=steps, learning_rate=args.lr,
                    lr_scheduler_type="constant", optim="sgd", max_grad_norm=0.0, use_cpu=True, report_to="none",
                    save_strategy="no", logging_steps=1, disable_tqdm=True, completion_only_loss=True, max_length=None,
                    packing=False, padding_free=False, shuffle_dataset=False, train_sampling_strategy="sequential",
                    dataloader_num_workers=0, seed=0)
    model = common.model(args)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    grads: dict[str, torch.Tensor] = {}

    def keep_grads(optimizer: torch.optim.Optimizer, *a: object, **k: object) -> None:
        for n, p in model.named_parameters():  # after accumulation, before the step
            if p.grad is not None:
                grads[n] = p.grad.detach().clone()

    trainer.create_optimizer()
    trainer.optimizer.register_step_pre_hook(keep_grads)
    out = trainer.train()
    common.done("trl", float(out.training_loss), grads, args.out)


if __name__ == "__main__":
    main()
