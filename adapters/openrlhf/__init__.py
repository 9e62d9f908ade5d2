"""The OpenRLHF adapter (`adapter`), its knobs (`knobs`), its code path (`sft`: the `openrlhf.cli.train_sft` entry
point run in-process) and the path's support: environment pins (`env`), CPU patches (`cpu`), the files OpenRLHF
loads (`fixture`), its CLI arguments in both spellings (`cli_args`) and the read-out recorder (`recorder`).
Importing this package imports no framework."""
