#!/usr/bin/env python
"""Train with the whole step (forward, backward, gradient clipping, AdamW) captured as one CUDA graph.

The host then does nothing per step but copy the next batch into the tensors the graph reads, so the GPU never waits
for Python (of3b on an H100, 8 x 255 tokens, the original benchmark's trainables: 24,915 tok/s this way with `--bf16`,
18,696 with CUDA graphs per compiled block; 25,913 this way with `freeze_for_training()`'s; README, Benchmarks).
What it takes:

- fixed shapes: every batch padded to `--length` tokens (`max_length` + `pad_to_multiple_of` in the collator) and to
  `--max-images` images per row (padding images are never attended), the last short batch dropped;
- no host sync in the step: the collator's `image_indices` spare the forward its check of the `<image>` tokens, and
  AdamW runs with `capturable=True`. transformers' GPT-NeoX and LLaMA (OpenFlamingo-4B and the like) check a 2-D
  attention mask on the host, so they get it as a 4-D causal mask, which they use as it is (MPT and MosaicGPT,
  OpenFlamingo-3B and -9B, take the 2-D one);
- compiled blocks (`model.compile_repeated_blocks()`) so that the graph replays fused kernels.

With `--bf16` (bf16 autocast) the optimizer is `MixedPrecisionAdamW`: the trainable Linear weights are stored in bf16,
which is what autocast computes with anyway, and the optimizer keeps their fp32 master weights, clips in fp32 and
writes the bf16 copies itself (of3b: 25,913 tok/s, against 24,739 with fp32 weights and torch's fused AdamW in the
same job).

Without CUDA it runs the same steps eagerly (what CI checks: the data and the step). Without `--model` it trains the
tiny demo model on captions of the demo images. Examples:

    python examples/train_cuda_graph.py                                  # tiny demo model
    python examples/train_cuda_graph.py --model path/to/converted-3b --dataset my_captions --caption-column caption \\
        --length 64 --batch-size 32 --max-steps 1000 --output-dir out
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from typing import Any

import torch
from demo_model import add_device_argument, resolve_model
from finetune import add_training_arguments, load_training_dataset, training_collator
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor, PretrainedConfig

import modeling_openflamingo  # noqa: F401 - registers the Auto classes
from modeling_openflamingo import (
    MixedPrecisionAdamW,
    OpenFlamingoDataCollator,
    attention_mask_without_host_sync,
    autocast_linear_parameters,
)


class FixedShapeCollator:
    """`OpenFlamingoDataCollator`, then `pixel_values` zero-padded to `max_images` images per row (every batch then
    has the same shapes: the collator already pads the tokens to `length`), and the attention mask in the form that
    `config`'s LM reads without a host sync ([`attention_mask_without_host_sync`])."""

    def __init__(self, collator: OpenFlamingoDataCollator, max_images: int, config: PretrainedConfig) -> None:
        self.collator = collator
        self.max_images = max_images
        self.config = config

    def __call__(self, features: list[Any]) -> dict[str, torch.Tensor]:
        batch = self.collator(features)
        if "pixel_values" not in batch:
            raise ValueError("A batch without images: every batch of a captured step needs the same inputs.")
        pixel_values = batch["pixel_values"]
        if pixel_values.shape[1] > self.max_images:
            raise ValueError(f"A row has {pixel_values.shape[1]} images; raise --max-images ({self.max_images}).")
        missing = self.max_images - pixel_values.shape[1]
        padding = pixel_values.new_zeros(len(pixel_values), missing, *pixel_values.shape[2:])
        batch["pixel_values"] = torch.cat((pixel_values, padding), dim=1)
        batch["attention_mask"] = attention_mask_without_host_sync(batch["attention_mask"], self.config)
        return batch


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train for `--max-steps` steps; return the losses of every step (and save to `--output-dir` if given)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(parser)
    parser.add_argument("--length", type=int, default=16, help="every batch is padded (or truncated) to this")
    parser.add_argument("--max-images", type=int, default=1, help="images per row, zero-padded to this")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="bf16 autocast, with MixedPrecisionAdamW (bf16 Linear weights, fp32 masters)",
    )
    parser.add_argument("--warmup-steps", type=int, default=3, help="CUDA: steps run before the capture")
    add_device_argument(parser)
    parser.add_argument("--output-dir", help="save the trained model (and processor) here")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    graphed = device.type == "cuda"

    path = resolve_model(args.model)
    model = AutoModelForImageTextToText.from_pretrained(path).to(device)
    processor = AutoProcessor.from_pretrained(path)
    model.freeze_for_training()
    model.train()
    collator = training_collator(processor, args, max_length=args.length, pad_to_multiple_of=args.length)
    loader = torch.utils.data.DataLoader(
        load_training_dataset(args),  # the demo captions without --dataset
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),  # the same order on every device
        drop_last=True,
        collate_fn=FixedShapeCollator(collator, args.max_images, model.config),
    )
    if len(loader) == 0:
        raise ValueError(f"The dataset has fewer rows than --batch-size ({args.batch_size}).")

    def batches() -> Any:
        while True:
            yield from loader

    data = batches()
    static = {name: tensor.to(device) for name, tensor in next(data).items()}  # what every step reads
    groups = model.training_parameter_groups(args.weight_decay)
    if args.bf16:
        # the Linear weights stored in bf16 (what autocast computes with anyway) with fp32 master weights in the
        # optimizer: the same training, without casting them every step
        optimizer = MixedPrecisionAdamW(
            groups, lr=args.learning_rate, low_precision_params=autocast_linear_parameters(model)
        )
        clip_grad_norm = optimizer.clip_grad_norm_  # in fp32
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, fused=graphed, capturable=graphed)
        params = [p for p in model.parameters() if p.requires_grad]
        clip_grad_norm = functools.partial(torch.nn.utils.clip_grad_norm_, params)

    def train_step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(**static).loss
        loss.backward()
        clip_grad_norm(args.max_grad_norm)
        optimizer.step()
        return loss.detach()

    def load(batch: dict[str, torch.Tensor]) -> None:
        for name, tensor in batch.items():
            static[name].copy_(tensor, non_blocking=True)

    if graphed:
        if args.warmup_steps < 1:
            raise ValueError("--warmup-steps must be at least 1 on CUDA: the blocks compile before the capture.")
        model.compile_repeated_blocks()
    losses: list[torch.Tensor] = []
    graph = static_loss = None
    for step in tqdm(range(args.max_steps), desc="train", disable=None):
        if step > 0:
            load(next(data))
        if not graphed:
            losses.append(train_step())
            optimizer.zero_grad(set_to_none=True)
        elif step < args.warmup_steps:  # compiles the blocks, makes AdamW's state; on a side stream, as capture wants
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                losses.append(train_step())
                optimizer.zero_grad(set_to_none=True)
            torch.cuda.current_stream().wait_stream(side)
        else:
            if graph is None:  # gradients are allocated inside the capture: every replay overwrites them
                graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(graph):
                        static_loss = train_step()
                except RuntimeError as error:
                    raise RuntimeError(
                        "The training step could not be captured as a CUDA graph (a host sync in the language "
                        "model's code?)."
                    ) from error
            graph.replay()
            losses.append(static_loss.clone())
    values = [float(loss) for loss in losses]
    how = "one CUDA graph per step" if graph is not None else "compiled, none captured" if graphed else "eager"
    print(f"model: {path}\nsteps: {len(values)} ({how}), loss: {values[0]:.4f} -> {values[-1]:.4f}")
    if args.output_dir:
        masters = optimizer.master_weights() if args.bf16 else contextlib.nullcontext()
        with masters:  # the fp32 weights, not their bf16 copies
            model.save_pretrained(args.output_dir)
        processor.save_pretrained(args.output_dir)
        print(f"saved to {args.output_dir}")
    return {"losses": values, "graphed": graph is not None, "model": model}


if __name__ == "__main__":
    main()
