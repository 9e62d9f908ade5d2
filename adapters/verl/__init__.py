"""The verl adapter (`adapter`), its knobs (`knobs`), one module per verl code path it drives (`engine_sft`,
`engine_actor`, `engine_critic` on verl's model-engine TrainingWorker (`engine`); `legacy_actor`, `legacy_sft`), what
the paths share (`common`: config mapping, PPO batches, scalar read-outs; `fsdp`: the legacy workers' FSDP wrapping
and optimizer) and the CPU support (`cpu`). Importing this package imports no framework."""
