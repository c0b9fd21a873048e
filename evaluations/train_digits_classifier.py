"""Train the digits classifier behind `evaluator.py --features digits` and write its weights
(a plain state dict, atomically) to evaluations/digits_classifier.pt.

The embedded 1,797 digits (16x16 RGB, cm.image_datasets.load_digits_arrays) are split once with a
seeded permutation: 20% held out, never trained on, the rest trained on with random shifts of up to
2 pixels. Deterministic on the CPU (fixed seed, deterministic algorithms, one thread); about 15 seconds.

    python evaluations/train_digits_classifier.py
"""

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F


from cm.checkpoints import atomic_save
from cm.image_datasets import load_digits_arrays
from evaluations.feature_extractors import DIGITS_WEIGHTS, DigitsClassifier, digits_input

HELD_OUT_FRACTION = 0.2
MAX_SHIFT = 2


def split_indices(num_images, seed):
    """(train, held_out) index arrays: a seeded permutation, its first 20% held out."""
    order = np.random.default_rng(seed).permutation(num_images)
    num_held_out = round(HELD_OUT_FRACTION * num_images)
    return order[num_held_out:], order[:num_held_out]


def random_shift(x, generator):
    """Shift each image by up to MAX_SHIFT pixels each way, filling with the background value -1."""
    n, _, h, w = x.shape
    padded = F.pad(x, (MAX_SHIFT,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * MAX_SHIFT + 1, (2, n, 1), generator=generator)
    rows = (dy + torch.arange(h))[:, :, None]  # [n, h, 1]
    cols = (dx + torch.arange(w))[:, None, :]  # [n, 1, w]
    return padded.permute(0, 2, 3, 1)[torch.arange(n)[:, None, None], rows, cols].permute(0, 3, 1, 2)


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    return (model(x).argmax(dim=1) == y).float().mean().item()


def train(epochs=30, batch_size=64, lr=2e-3, seed=0):
    """-> (trained DigitsClassifier, held-out accuracy)."""
    torch.manual_seed(seed)
    images, labels = load_digits_arrays(16)
    x = digits_input(images, "cpu")
    y = torch.from_numpy(labels)
    train_idx, held_idx = (torch.from_numpy(i) for i in split_indices(len(y), seed))
    model = DigitsClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = -(-len(train_idx) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = train_idx[torch.randperm(len(train_idx), generator=generator)]
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            loss = F.cross_entropy(model(random_shift(x[rows], generator)), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if (epoch + 1) % 10 == 0:
            held_out = accuracy(model, x[held_idx], y[held_idx])
            print(f"epoch {epoch + 1}: loss {loss.item():.4f}, held-out accuracy {held_out:.4f}")
    return model.eval(), accuracy(model, x[held_idx], y[held_idx])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DIGITS_WEIGHTS, help="where to write the state dict")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    # one thread: as fast as two for a network this small, and the result does not depend on the core count
    torch.set_num_threads(1)
    start = time.time()
    model, held_out = train(epochs=args.epochs, seed=args.seed)
    atomic_save(model.state_dict(), args.out)
    print(f"held-out accuracy {held_out:.4f} ({time.time() - start:.0f} s); wrote {args.out}")


if __name__ == "__main__":
    main()
