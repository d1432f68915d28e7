"""Run by `tests/test_training.py` with 2 CPU processes (torchrun, gloo): rank 0 trains on a text-only batch, rank 1 on
a batch with images, through DDP (`find_unused_parameters=False`, as `Trainer` sets it with gradient checkpointing)
and through FSDP2 (`fully_shard` on every block, the Perceiver, the vision tower and the root). Every rank must run
the same modules: before the blank image (`OpenFlamingoForConditionalGeneration.forward`), DDP waited forever for the
text-only rank's unused gradients and FSDP2's collectives did not match. Writes one JSON line per rank to argv[1]."""

from __future__ import annotations

import copy
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_core import MEDIA, inputs, tiny_model  # noqa: E402


def batch_of(rank: int) -> dict[str, torch.Tensor]:
    ids, pixel_values = inputs(batch=2, seq=10, seed=rank)
    if rank == 0:  # text-only: no <image> token, no images
        ids = ids.masked_fill(ids == MEDIA, 7)
        return {"input_ids": ids, "labels": ids.clone()}
    return {"input_ids": ids, "pixel_values": pixel_values, "labels": ids.clone()}


def main() -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    rank = int(os.environ["RANK"])
    reference = tiny_model("llama").train()
    reference.freeze_for_training()
    batch = batch_of(rank)
    alone = reference(**batch).loss.item()  # before torch.distributed is set up: no blank image
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    result = {"rank": rank, "loss_alone": alone, "blank": reference._text_only_batches_run_the_image_path(None)}

    ddp_model = copy.deepcopy(reference)
    ddp = DistributedDataParallel(ddp_model, find_unused_parameters=False)
    for _ in range(2):  # a second step: DDP raises there if the first left a gradient unreduced
        ddp_model.zero_grad()
        loss = ddp(**batch).loss
        loss.backward()
    result["loss_ddp"] = loss.item()
    trainable = [name for name, p in ddp_model.named_parameters() if p.requires_grad]
    result["ddp_missing_grads"] = [n for n, p in ddp_model.named_parameters() if p.requires_grad and p.grad is None]
    result["trainable"] = len(trainable)

    fsdp_model = copy.deepcopy(reference)
    for module in (*fsdp_model.gated_cross_attn_layers.values(), fsdp_model.perceiver, fsdp_model.vision_model):
        fully_shard(module)
    fully_shard(fsdp_model)
    for _ in range(2):
        fsdp_model.zero_grad()
        loss = fsdp_model(**batch).loss
        loss.backward()
    result["loss_fsdp"] = loss.item()
    dist.barrier()  # every rank's collectives done before any leaves (a rank that left early aborted the other)
    with open(sys.argv[1], "a") as out:
        out.write(json.dumps(result) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
