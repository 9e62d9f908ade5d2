"""The DeepSpeed step by hand: deepspeed.initialize with the case's ZeRO config (stage 2, offload_optimizer cpu, torch
SGD), grad_accum micro-batches through engine.backward, full gradients read with safe_get_full_grad before the
boundary step. No stepdiff: the baseline `stepdiff bench` compares the harness's overhead against.

    <deepspeed env>/bin/python benchmarks/bare/deepspeed_step.py [--zero-stage 2 --offload cpu --grad-accum 4]
"""

from __future__ import annotations

import importlib
import os
import socket

import common


def main() -> None:
    args = common.parse()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(k, v)
    import deepspeed
    import torch
    from deepspeed.utils import safe_get_full_grad

    # the same g++-free comm set-up a CPU user needs (DeepSpeed would JIT a shared-memory comm op otherwise)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    m = common.model(args)
    m.train()
    zero = {"stage": args.zero_stage}
    if args.offload != "none":
        zero["offload_optimizer"] = {"device": args.offload}
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": args.grad_accum,
              "train_batch_size": args.grad_accum, "zero_optimization": zero, "zero_allow_untested_optimizer": True,
              "zero_force_ds_cpu_optimizer": False, "gradient_clipping": 0.0, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=m, optimizer=torch.optim.SGD(m.parameters(), lr=args.lr), config=config)
    data = [common.batch(p, r) for p, r in common.samples(args)]
    n_tokens = sum(int((lab[:, 1:] != -100).sum()) for _, lab in data)
    total = 0.0
    grads = {}
    for i, (ids, labels) in enumerate(data):
        ce, _ = common.token_loss(engine, ids, labels)
        engine.backward(ce / n_tokens * args.grad_accum)  # DeepSpeed scales each micro-batch by 1/grad_accum
        total += float(ce.detach()) / n_tokens
        if i == len(data) - 1:
            grads = {n: safe_get_full_grad(p).detach().float().clone() for n, p in engine.module.named_parameters()}
        engine.step()
    common.done("deepspeed", total, grads, args.out)
    # as a user's script ends: without it gloo's threads may still be joinable at exit ("terminate called without an
    # active exception", exit code 134, seen once in ~10 runs)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
