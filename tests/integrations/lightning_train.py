"""A user's Lightning script with gradsieve's callback, run on 2 CPU processes by Lightning itself
(``python lightning_train.py OUT``: strategy "ddp" starts rank 1 by running this script again).

1. fits a small model for 6 steps with ``GradsieveCallback`` (CSV logger, one row per step), then
   saves a checkpoint with ``trainer.save_checkpoint``; each rank writes what its hook state was
   at that moment to ``OUT/saved-rank{r}.pt``;
2. in the same processes, a new model, state and callback resume from that checkpoint for 3 more
   steps; each rank writes its hook state as the resumed fit starts (before its first batch) and
   its statistics at the end to ``OUT/resumed-rank{r}.pt``.
"""

import gc
import os
import sys

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

import gradsieve
from gradsieve.integrations.lightning import GradsieveCallback

DENSITY = 0.05


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=g)
    return DataLoader(TensorDataset(x, (x[:, :4].argmax(1))), batch_size=16)


class RecordAtStart(L.Callback):
    """Keeps the hook state as the fit starts, after the checkpoint was loaded."""

    def __init__(self, gradsieve_callback):
        self.gradsieve_callback, self.at_start = gradsieve_callback, None

    def on_train_start(self, trainer, pl_module):
        self.at_start = self.gradsieve_callback.state.state_dict()


def main(out):
    torch.set_num_threads(1)
    common = dict(accelerator="cpu", devices=2, strategy="ddp", enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False)

    # 1. train, log, save
    L.seed_everything(0)
    state = gradsieve.CompressionState("topk", density=DENSITY)
    trainer = L.Trainer(max_steps=6, logger=CSVLogger(out, name="logs"), log_every_n_steps=1,
                        callbacks=[GradsieveCallback(state)], **common)
    trainer.fit(Classifier(), loader())
    trainer.save_checkpoint(os.path.join(out, "run.ckpt"))
    rank = trainer.global_rank
    torch.save({"state": state.state_dict(), "stats": state.stats()}, os.path.join(out, f"saved-rank{rank}.pt"))

    # 2. a new model, state and callback resume from the checkpoint
    L.seed_everything(1)
    state2 = gradsieve.CompressionState("topk", density=DENSITY)
    callback2 = GradsieveCallback(state2, log=())
    record = RecordAtStart(callback2)
    trainer2 = L.Trainer(max_steps=9, logger=False, callbacks=[callback2, record], **common)
    trainer2.fit(Classifier(), loader(), ckpt_path=os.path.join(out, "run.ckpt"))
    torch.save({"at_start": record.at_start, "stats": state2.stats()}, os.path.join(out, f"resumed-rank{rank}.pt"))
    # Objects that hold the process group are freed before it is destroyed (docs/integrations.md).
    del trainer, trainer2
    gc.collect()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
