"""A user's Transformers Trainer script with gradsieve's callback, for 2 CPU processes:

    torchrun --standalone --nproc-per-node 2 transformers_train.py OUT

1. trains a small model for 6 steps with a checkpoint at step 6 (``OUT/run/checkpoint-6``); each
   rank writes its hook state and statistics to ``OUT/saved-rank{r}.pt``;
2. in the same processes, a new model, state and Trainer resume from that checkpoint
   (``resume_from_checkpoint=True``) for 3 more steps; each rank writes its hook state as training
   begins (after the callback loaded it) and its statistics at the end to ``OUT/resumed-rank{r}.pt``.
"""

import gc
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

import gradsieve
from gradsieve.integrations.transformers import GradsieveCallback

DENSITY = 0.05


class Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class Points(Dataset):
    def __init__(self):
        self.x = torch.randn(512, 32, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.x[i, :4].argmax()}


class RecordAtBegin(TrainerCallback):
    def __init__(self, state):
        self.state, self.at_begin = state, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.at_begin = self.state.state_dict()


def trainer_for(out, max_steps, seed):
    torch.manual_seed(seed)
    args = TrainingArguments(output_dir=os.path.join(out, "run"), use_cpu=True, max_steps=max_steps,
                             per_device_train_batch_size=16, learning_rate=0.1, optim="sgd",
                             lr_scheduler_type="constant", save_strategy="steps", save_steps=6, report_to="none",
                             logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=seed)
    return Trainer(model=Classifier(), args=args, train_dataset=Points())


def main(out):
    torch.set_num_threads(1)
    trainer = trainer_for(out, 6, 0)
    state = gradsieve.CompressionState("topk", density=DENSITY)
    trainer.add_callback(GradsieveCallback(trainer, state))
    trainer.train()
    rank = trainer.args.process_index
    torch.save({"state": state.state_dict(), "stats": state.stats(), "global_step": trainer.state.global_step,
                "world": trainer.args.world_size}, os.path.join(out, f"saved-rank{rank}.pt"))

    trainer2 = trainer_for(out, 9, 1)
    state2 = gradsieve.CompressionState("topk", density=DENSITY)
    callback2 = GradsieveCallback(trainer2, state2)
    record = RecordAtBegin(state2)
    trainer2.add_callback(callback2)
    trainer2.add_callback(record)
    trainer2.train(resume_from_checkpoint=True)
    torch.save({"at_begin": record.at_begin, "stats": state2.stats(), "global_step": trainer2.state.global_step,
                "loaded_from": callback2.loaded_from}, os.path.join(out, f"resumed-rank{rank}.pt"))
    # Objects that hold the process group are freed before it is destroyed (docs/integrations.md).
    del trainer, trainer2, callback2, record
    gc.collect()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
