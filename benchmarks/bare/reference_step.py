"""The reference step by hand: plain PyTorch, one SGD step over grad_accum micro-batches with one global token mean.
No stepdiff: the baseline `stepdiff bench` compares the harness's overhead against."""

from __future__ import annotations

import common


def main() -> None:
    args = common.parse()
    import torch

    m = common.model(args)
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=args.lr)
    data = [common.batch(p, r) for p, r in common.samples(args)]
    n_tokens = sum(int((lab[:, 1:] != -100).sum()) for _, lab in data)
    total = 0.0
    for ids, labels in data:
        ce, _ = common.token_loss(m, ids, labels)
        (ce / n_tokens).backward()
        total += float(ce.detach()) / n_tokens
    grads = {n: p.grad.detach().clone() for n, p in m.named_parameters()}
    opt.step()
    common.done("reference", total, grads, args.out)


if __name__ == "__main__":
    main()
