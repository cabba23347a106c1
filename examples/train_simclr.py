"""Train a small SimCLR model on synthetic data with a remote NTXentLoss.

The only lossd-specific lines are the import and the `server=` argument: the rest is
what a lightly trainer looks like.

    lossd serve &                       # or: make serve
    python examples/train_simclr.py --steps 100 --server localhost:50051
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from lossd.client import NTXentLoss  # was: from lightly.loss import NTXentLoss


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random view of x (B, D): per-sample scaling plus noise."""
    scale = 1 + 0.2 * torch.randn(x.shape[0], 1, generator=generator)
    return x * scale + 0.3 * torch.randn(x.shape, generator=generator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", default=None, help="host:port (default: $LOSSD_SERVER)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--bank", type=int, default=0, help="memory bank rows (MoCo); 0: none")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    data = torch.randn(1024, 32, generator=generator)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    bank = (args.bank, 16) if args.bank else 0
    criterion = NTXentLoss(temperature=0.5, memory_bank_size=bank, server=args.server)

    for step in range(args.steps):
        batch = data[torch.randint(0, len(data), (args.batch_size,), generator=generator)]
        out0 = model(augment(batch, generator))
        out1 = model(augment(batch, generator))
        loss = criterion(out0, out1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)
    criterion.close(delete_session=True)


if __name__ == "__main__":
    main()
