"""Data parallelism through torchrun: the frozen base is replicated on every rank, each rank
runs its share of an effective batch, the LoRA gradients are all-reduced (PhaseGuard-KL's
loop in phaseguard.py calls this; without torchrun it is rank 0 of 1 and does nothing)."""
from __future__ import annotations

import os

import torch


class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without one). Rank 0 monitors and
    writes; every rank runs its share of each effective batch and the same AdamW step."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def parallel(self) -> bool:
        """More than one process: the collectives below do something."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: it monitors and writes."""
        return self.rank == 0

    def share_of(self, items: list) -> list:
        """This rank's share of an effective batch's micro-batches (every world-th, from its rank)."""
        return items[self.rank::self.world]

    def join(self, device: str) -> str:
        """Join the job (NCCL on CUDA, gloo on the CPU); this rank's device."""
        if not self.parallel:
            return device
        import datetime
        import torch.distributed as td
        cuda = device.startswith("cuda")
        if cuda:
            device = f"cuda:{self.local_rank}"
            torch.cuda.set_device(device)
        if not td.is_initialized():
            # A rank that dies leaves the others waiting in a collective: the timeout (and torchrun,
            # which stops the job when one worker fails) ends the job instead of a hang.
            td.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=10))
        return device

    def barrier(self):
        if self.parallel:
            import torch.distributed as td
            td.barrier()

    def sum_across_ranks(self, params: list, values: list[float]) -> list[float]:
        """Sum the params' gradients (in place) and a few floats (returned) over the ranks, in one flat all-reduce."""
        if not self.parallel:
            return values
        import torch.distributed as td
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor(values, device=grads[0].device)])
        td.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).to(g.dtype)
            offset += g.numel()
        return flat[offset:].tolist()

    def broadcast_from_main(self, obj):
        """rank 0's obj on every rank (the monitor's result and the trigger state)."""
        if not self.parallel:
            return obj
        import torch.distributed as td
        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def tell_launcher(self, line: str):
        """torchrun's failure summary shows a failed worker's error file (TORCHELASTIC_ERROR_FILE,
        set per worker) as that worker's "traceback": the line, in the form torchrun's own
        `@record` writes (its py_callstack is what the summary prints)."""
        path = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if path:
            import contextlib
            import json
            import time
            with contextlib.suppress(OSError):
                with open(path, "w") as out:
                    json.dump({"message": {"message": line, "extraInfo": {
                        "py_callstack": line, "timestamp": str(int(time.time()))}}}, out)

    def leave(self):
        """Leave the job (the process group is destroyed)."""
        if self.parallel:
            import torch.distributed as td
            if td.is_initialized():
                td.destroy_process_group()
