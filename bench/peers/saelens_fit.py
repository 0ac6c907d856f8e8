"""SAELens's BatchTopK trainer on a fixed activation matrix (run by bench/fit.py in .venv-peers).

    python saelens_fit.py ACTS.npy --width 1024 --k 30 --steps 600 --batch 1024 --lr 2e-3 --seed 0

SAELens trains SAEs (it reconstructs its input) and has no transcoder trainer, so the nearest like-for-like is an SAE
of the same width, sparsity method (BatchTopK, saved as JumpReLU), batch and number of steps on the very activations
acg's transcoder reads. Prints one JSON object: the wall time of `SAETrainer.fit`, tokens per second, FVU and L0.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, LoggingConfig  # noqa: E402
from sae_lens.config import SAETrainerConfig  # noqa: E402
from sae_lens.training.sae_trainer import SAETrainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("acts")
    ap.add_argument("--width", type=int, required=True)
    ap.add_argument("--k", type=float, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    x = torch.as_tensor(np.load(args.acts), dtype=torch.float32)
    gen = torch.Generator().manual_seed(args.seed)

    def batches():
        while True:
            yield x[torch.randint(0, len(x), (args.batch,), generator=gen)]

    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=x.shape[1], d_sae=args.width, k=args.k))
    cfg = SAETrainerConfig(
        total_training_samples=args.steps * args.batch,
        train_batch_size_samples=args.batch,
        lr=args.lr,
        lr_end=args.lr / 10,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=min(100, args.steps // 10),
        lr_decay_steps=args.steps,
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=10,
    )
    trainer = SAETrainer(cfg, sae, batches())
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        feats = sae.encode(x)
        rec = sae.decode(feats)
        fvu = float(((rec - x) ** 2).sum(-1).mean() / ((x - x.mean(0)) ** 2).sum(-1).mean())
        l0 = float((feats != 0).float().sum(-1).mean())
    print(
        json.dumps(
            {
                "tool": "sae-lens",
                "seconds": seconds,
                "tokens_trained": args.steps * args.batch,
                "tokens_per_second": args.steps * args.batch / seconds,
                "fvu": fvu,
                "l0": l0,
            }
        )
    )


if __name__ == "__main__":
    main()
