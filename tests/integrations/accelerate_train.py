"""A user's Accelerate script with gradsieve's hook, for 2 CPU processes:

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 accelerate_train.py OUT

Registers the hook on the prepared model (and keeps what ``register`` says about the unprepared
model and about a second state), trains 6 steps, saves with ``accelerator.save_state``, trains 2
more steps (the memory moves on), loads the saved state back and trains 1 more step. Each rank
writes to ``OUT/rank{r}.pt``: those errors, its hook state when saved and after loading, and its
statistics.
"""

import os
import sys

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

import gradsieve
from gradsieve.integrations.accelerate import register

DENSITY = 0.05


def main(out):
    torch.set_num_threads(1)
    accelerator = Accelerator()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(512, 32, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(x, x[:, :4].argmax(1)), batch_size=16, shuffle=True)
    state = gradsieve.CompressionState("topk", density=DENSITY)

    try:
        register(accelerator, model, state)  # the model before prepare: not a DDP module
        unprepared_error = None
    except ValueError as error:
        unprepared_error = str(error)

    model, opt, loader = accelerator.prepare(model, opt, loader)
    ddp = register(accelerator, model, state)
    again = register(accelerator, model, state) is ddp  # the same state again: nothing more is done
    try:
        register(accelerator, model, gradsieve.CompressionState("topk", density=DENSITY))
        second_hook_error = None
    except ValueError as error:  # DDP takes one communication hook
        second_hook_error = str(error)

    def train(model, steps):
        for _, (xb, yb) in zip(range(steps), loader):
            loss = F.cross_entropy(model(xb), yb)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()

    train(model, 6)
    accelerator.save_state(os.path.join(out, "checkpoint"))
    saved, saved_stats = state.state_dict(), state.stats()
    train(model, 2)
    accelerator.load_state(os.path.join(out, "checkpoint"))
    loaded = state.state_dict()
    train(model, 1)
    torch.save({"unprepared_error": unprepared_error, "again": again, "second_hook_error": second_hook_error,
                "saved": saved, "saved_stats": saved_stats, "loaded": loaded, "stats": state.stats(),
                "world": accelerator.num_processes, "type": str(accelerator.distributed_type)},
               os.path.join(out, f"rank{accelerator.process_index}.pt"))
    # The DDP module holds the process group: freed before the group is destroyed (docs/integrations.md).
    del model, ddp
    accelerator.free_memory()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
