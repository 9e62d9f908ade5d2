"""The DeepSpeed adapter (`adapter`), its knobs (`knobs`), its one code path (`engine`: DeepSpeedEngine driven
directly) and DeepSpeed's CPU patches (`cpu`, shared with every adapter that runs DeepSpeed's engine: OpenRLHF's
strategy, TRL through accelerate). Importing this package imports no framework."""
