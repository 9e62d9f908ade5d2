"""The TRL adapter (`adapter`), its knobs (`knobs`), one module per trainer it drives (`sft`, `dpo`, `grpo`), the
trainer set-up they share (`common`: tokenizer, config from the spec, data placement) and the read-outs (`capture`).
Importing this package imports no framework."""
