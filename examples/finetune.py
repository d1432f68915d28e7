#!/usr/bin/env python
"""Fine-tune OpenFlamingo with `Trainer`: the original recipe (frozen vision tower and LM; Perceiver, gated
cross-attention blocks and the added tokens' embedding rows trained), optionally with LoRA on the LM, FSDP and
gradient checkpointing.

Without `--model` it trains the tiny demo model on captions of the six demo images (CPU, about a minute on two
cores). Examples:

    python examples/finetune.py                                   # tiny demo model, demo captions
    python examples/finetune.py --lora --gradient-checkpointing   # + LoRA on the LM's attention
    torchrun --nproc_per_node 2 examples/finetune.py --fsdp       # FSDP2 (on CPU too, see --fsdp)
    python examples/finetune.py --model path/to/converted --dataset my_captions --caption-column caption --bf16
    python examples/finetune.py --max-steps 40 --save-steps 10 --resume-from-checkpoint latest  # from a checkpoint

A `--dataset` (a hub name, a local data folder, or a `save_to_disk` folder) needs a text column with `<image>` and
`<|endofchunk|>` in place (`--text-column`) or a plain caption column (`--caption-column`, made into
`<image>{caption}<|endofchunk|>`), and an image column (`--image-column`: one image or a list per row).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import transformers
from demo_model import DEMO_IMAGES, add_model_argument, resolve_model
from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

import modeling_openflamingo  # noqa: F401 - registers the Auto classes
from modeling_openflamingo import OpenFlamingoDataCollator, OpenFlamingoForConditionalGeneration, gets_weight_decay

DEMO_CAPTIONS = [
    "A small square of pixels.",
    "A picture with a bright corner.",
    "A tall image with stripes.",
    "A grey square.",
    "A wide image with two colours.",
    "A tiny icon.",
]

# The language models' own names for their attention projections (MPT and MosaicGPT, GPT-NeoX, LLaMA and the like).
LM_LORA_TARGETS = ("Wqkv", "query_key_value", "q_proj", "v_proj", "c_attn")


def demo_dataset() -> Any:
    """The six demo images with a caption each, as a `datasets.Dataset` with an `Image` feature (LAION-style)."""
    import datasets

    rows = {
        "images": [[str(DEMO_IMAGES / f"image_{i}.png")] for i in range(len(DEMO_CAPTIONS))],
        "text": [f"<image>{caption}<|endofchunk|>" for caption in DEMO_CAPTIONS],
    }
    return datasets.Dataset.from_dict(rows).cast_column("images", datasets.Sequence(datasets.Image()))


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments the training examples share: `--model`, the dataset's (read by [`load_training_dataset`]),
    steps, batch size, learning rate, weight decay and seed."""
    add_model_argument(parser)
    parser.add_argument("--dataset", help="datasets hub name or local folder (default: the demo captions)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--image-column", default="images")
    parser.add_argument("--caption-column", help="make the text column as <image>{caption}<|endofchunk|>")
    parser.add_argument("--interleaved", action="store_true", help="MMC4-style label masking")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1, help="on the cross-attention blocks only")
    parser.add_argument("--seed", type=int, default=0)


def training_collator(processor: Any, args: argparse.Namespace, **padding: Any) -> OpenFlamingoDataCollator:
    """`OpenFlamingoDataCollator` as the shared arguments ([`add_training_arguments`]) ask: `--interleaved` label
    masking and the dataset's columns. `padding`: `max_length` and/or `pad_to_multiple_of`."""
    return OpenFlamingoDataCollator(
        processor,
        interleaved=args.interleaved,
        text_column=args.text_column,
        image_column=args.image_column,
        **padding,
    )


def load_training_dataset(args: argparse.Namespace) -> Any:
    """The demo dataset, or `--dataset` (hub name, data folder or `save_to_disk` folder) with a `text` column."""
    if args.dataset is None:
        return demo_dataset()
    import datasets

    path = Path(args.dataset)
    if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        dataset = datasets.load_from_disk(str(path))
        dataset = dataset[args.split] if isinstance(dataset, datasets.DatasetDict) else dataset
    else:
        dataset = datasets.load_dataset(args.dataset, split=args.split)
    # the collator reads `--image-column`, else `image`
    image_column = next((c for c in (args.image_column, "image") if c in dataset.column_names), None)
    if image_column is None:
        raise SystemExit(
            f"error: {args.dataset} has no image column {args.image_column!r} (nor 'image'); its columns are "
            f"{dataset.column_names}: pass --image-column."
        )
    text_column = args.caption_column if args.caption_column is not None else args.text_column
    if text_column not in dataset.column_names:
        option = "--caption-column" if args.caption_column is not None else "--text-column (or --caption-column)"
        raise SystemExit(
            f"error: {args.dataset} has no column {text_column!r}; its columns are {dataset.column_names}: "
            f"pass {option}."
        )
    if args.caption_column is not None:
        # rows without a caption are skipped, as the original's LAION pipeline skips samples without one (a null
        # caption would otherwise be trained on as the text "None")
        rows = len(dataset)
        # (only the caption column is read: the images are not decoded to look at it)
        dataset = dataset.filter(
            lambda caption: isinstance(caption, str) and bool(caption.strip()), input_columns=args.caption_column
        )
        if len(dataset) < rows:
            print(f"skipped {rows - len(dataset)} of {rows} rows without a caption in {args.caption_column!r}")
        if not len(dataset):
            raise SystemExit(f"error: no row of {args.dataset} has a caption in {args.caption_column!r}.")
        dataset = dataset.map(  # stripped, as the original's LAION pipeline does
            lambda row: {args.text_column: f"<image>{row[args.caption_column].strip()}<|endofchunk|>"},
            remove_columns=[c for c in dataset.column_names if c != image_column],
        )
    return dataset


def next_token_label_smoothing(epsilon: float) -> Callable[..., torch.Tensor]:
    """A `Trainer` `compute_loss_func`: the model's own loss (each position's logits score the next token; -100 labels
    ignored; summed and divided by `num_items_in_batch`, the targets of the whole accumulated batch, or else the mean
    over this batch's targets) with label smoothing `epsilon`, the same smoothing as `Trainer`'s label smoother.
    Under PEFT's prompt learning (prompt tuning, p-tuning) the logits begin with the virtual tokens' positions, which
    PEFT gives -100 labels in the model's own loss: the loss scores the positions of the batch's own tokens."""

    def loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        if labels is not None and logits.shape[1] > labels.shape[1]:  # a soft prompt prepended (never a target)
            logits = logits[:, logits.shape[1] - labels.shape[1] :]
        return OpenFlamingoForConditionalGeneration.causal_lm_loss(
            logits, labels, num_items_in_batch, label_smoothing=epsilon
        )

    return loss


class FlamingoTrainer(Trainer):
    """`Trainer` with the original's weight decay (`gets_weight_decay`: the gated cross-attention blocks, all of them)
    and, with `label_smoothing_factor`, a smoothed loss of the next token ([`next_token_label_smoothing`]): `Trainer`'s
    label smoother shifts the labels only for the causal LMs it knows by class name (this model shifts them inside its
    own loss), and on transformers 4.x it takes no `num_items_in_batch` (a per-batch mean under gradient
    accumulation). As a `compute_loss_func` it is normalised by the accumulated batch's targets on both majors."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.label_smoother is not None and self.compute_loss_func is None:
            self.compute_loss_func = next_token_label_smoothing(self.args.label_smoothing_factor)

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """`Trainer`'s warnings for a resumed checkpoint's missing / unexpected names, counting what the model's load
        fills in: a sharded checkpoint's names are compared with `state_dict()` before its load hooks rename them, tie
        parameters and give the trained rows from the saved embedding matrix (`saved_names_load_report`)."""
        model = self.accelerator.unwrap_model(self.model)
        if isinstance(model, OpenFlamingoForConditionalGeneration):
            missing = set(load_result.missing_keys)
            saved = [name for name in model.state_dict() if name not in missing] + list(load_result.unexpected_keys)
            load_result = torch.nn.modules.module._IncompatibleKeys(*model.saved_names_load_report(saved))
        super()._issue_warnings_after_load(load_result)

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        """Names of the parameters that get weight decay, by the original's rule."""
        return [name for name, _ in model.named_parameters() if gets_weight_decay(name)]

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Any:
        """As `Trainer`'s, counting the targets the loss scores, `labels[..., 1:]` (the model shifts the labels), as
        transformers 5.x counts them; 4.x counts position 0 too, which a batch not made by `OpenFlamingoDataCollator`
        (which sets it to -100) may hold."""
        if int(transformers.__version__.split(".")[0]) < 5:
            batch_samples = [
                {**batch, "labels": batch["labels"][..., 1:]} if torch.is_tensor(batch.get("labels")) else batch
                for batch in batch_samples
            ]
        return super()._get_num_items_in_batch(batch_samples, device)


class CPUFSDPTrainer(FlamingoTrainer):
    """Runs `Trainer`'s own FSDP path on a machine without an accelerator (for this example and the tests).

    accelerate enables FSDP only for GPU-like devices (CUDA, XPU, NPU, ...); on CPU it silently falls back to DDP. This
    marks the accelerator state as FSDP on the CPU device after `Trainer` made it; everything else (wrapping,
    optimizer, saving) is `Trainer`'s and accelerate's own code. Use FSDP2 here: torch's FSDP1 full-state-dict
    gathering with `offload_to_cpu` crashes on CPU-only processes.
    """

    def create_accelerator_and_postprocess(self) -> None:
        """Make the accelerator as usual, then switch its state to FSDP on the CPU device."""
        super().create_accelerator_and_postprocess()
        from accelerate import FullyShardedDataParallelPlugin
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType

        state = self.accelerator.state
        if state.distributed_type == DistributedType.FSDP:
            return
        if getattr(state, "fsdp_plugin", None) is None:
            plugin_args = getattr(self.args, "fsdp_plugin_args", None)  # transformers 5; 4.x reads FSDP_* variables
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**plugin_args) if plugin_args else None
            if state.fsdp_plugin is None:
                state.fsdp_plugin = FullyShardedDataParallelPlugin()
        if self.accelerator.mixed_precision != "no" and state.fsdp_plugin.mixed_precision_policy is None:
            # As AcceleratorState does for an FSDP plugin on GPUs. FSDP2 runs without autocast: its
            # MixedPrecisionPolicy (parameters gathered in bf16) is all the mixed precision there is.
            state.fsdp_plugin.set_mixed_precision(self.accelerator.mixed_precision)
        state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        PartialState._shared_state["device"] = state.device = torch.device("cpu")
        self.is_fsdp_enabled = True


def checkpointing_arguments(enabled: bool) -> dict[str, Any]:
    """`TrainingArguments` keywords for non-reentrant gradient checkpointing, under the installed transformers' name
    (`activation_checkpointing` since 5.23, where the old `gradient_checkpointing` is deprecated and warns; 4.x and
    5.18-5.22 have only the old name)."""
    names = {field.name for field in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


def fsdp_training_arguments(on_cpu: bool) -> dict[str, Any]:
    """`TrainingArguments` keywords for FSDP2 full-shard with auto-wrap, for transformers 4.57 and 5.x.

    FSDP2 (`fully_shard`) auto-wraps the classes in `model._no_split_modules` (decoder layers, gated cross-attention
    blocks, Perceiver layers, CLIP encoder layers); frozen and trainable parameters mix freely. On transformers 4.x
    this also sets the `FSDP_*` variables through which 4.x passes FSDP settings to accelerate (if they are unset).
    """
    if int(transformers.__version__.split(".")[0]) >= 5:
        return {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": True}}
    os.environ.setdefault("FSDP_VERSION", "2")
    os.environ.setdefault("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT")  # so that save_model writes the model
    return {"fsdp": "full_shard auto_wrap", "fsdp_config": {"sync_module_states": not on_cpu}}


def training_arguments(args: argparse.Namespace, on_cpu: bool) -> TrainingArguments:
    """`TrainingArguments` for this run (FSDP settings that work with transformers 4.57 and 5.x)."""
    kwargs: dict[str, Any] = fsdp_training_arguments(on_cpu) if args.fsdp else {}
    return TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type="constant_with_warmup",
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        save_total_limit=args.save_total_limit,
        report_to=[],
        remove_unused_columns=False,  # the collator needs the `text` and `images` columns
        **checkpointing_arguments(args.gradient_checkpointing),
        bf16=args.bf16,
        use_cpu=on_cpu,
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **kwargs,
    )


def launched_as_one_of_several_processes() -> bool:
    """Whether a launcher started this process for torch.distributed, as accelerate tells: torchrun (and
    `accelerate launch`'s GPU launchers) set LOCAL_RANK; on the CPU accelerate also takes an MPI launch's world size
    (`accelerate launch --cpu --mpirun_hostfile ...`, `mpirun -n 2`), which sets no LOCAL_RANK."""
    if "LOCAL_RANK" in os.environ or (dist.is_available() and dist.is_initialized()):
        return True
    if torch.cuda.is_available():  # accelerate's multi-GPU state needs LOCAL_RANK
        return False
    sizes = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "WORLD_SIZE")
    return any(os.environ.get(name, "").isdigit() and int(os.environ[name]) > 1 for name in sizes)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Fine-tune, save to `--output-dir`, and return the first and last logged losses."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(parser)
    parser.add_argument("--max-length", type=int, help="truncate texts to this many tokens")
    parser.add_argument("--output-dir", default="finetuned-openflamingo")
    parser.add_argument(
        "--save-steps", type=int, help="write a checkpoint (model, optimizer, scheduler) to OUTPUT_DIR/checkpoint-N"
    )
    parser.add_argument("--save-total-limit", type=int, help="keep at most this many checkpoints")
    parser.add_argument(
        "--resume-from-checkpoint",
        help="continue a run from OUTPUT_DIR/checkpoint-N (a path), or from the latest one in OUTPUT_DIR ('latest'; "
        "from the start when there is none yet)",
    )
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--freeze-embeddings", action="store_true", help="do not train the added tokens' rows")
    parser.add_argument("--lora", action="store_true", help="also LoRA on the LM's attention (PEFT)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 via Trainer; launch with torchrun")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument(
        "--compile-blocks", action="store_true", help="regional torch.compile (model.compile_repeated_blocks())"
    )
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile-blocks")
    args = parser.parse_args(argv)
    for name in ("save_steps", "save_total_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.fsdp and not launched_as_one_of_several_processes():
        # FSDP needs torch.distributed's process group: without a launcher, accelerate falls back to no FSDP on a
        # GPU, and on the CPU (CPUFSDPTrainer) the first step fails once the model and data are loaded
        parser.error(
            "--fsdp shards the model across processes: launch with torchrun, e.g. "
            "`torchrun --nproc_per_node 2 examples/finetune.py --fsdp` (one process per GPU)"
        )
    resume: str | None = args.resume_from_checkpoint
    if resume == "latest":
        # the newest checkpoint-N in the output folder; none yet (a first run of a resumable job): from the start
        resume = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
        if resume is None:
            print(f"--resume-from-checkpoint latest: no checkpoint in {args.output_dir} yet; starting from step 0")
    elif resume is not None and not Path(resume).is_dir():
        parser.error(f"--resume-from-checkpoint {resume}: no such folder (a checkpoint-N folder, or 'latest')")
    # before the model is built: LoRA's weights are drawn before `Trainer` seeds the run
    transformers.set_seed(args.seed)

    path = resolve_model(args.model)
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    model.freeze_for_training(train_new_token_embeddings=not args.freeze_embeddings)
    if args.compile_blocks:  # compiled at the first step; LoRA layers added below are traced with their blocks
        model.compile_repeated_blocks(backend=args.compile_backend)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        present = {name.rsplit(".", 1)[-1] for name, _ in model.language_model.named_modules()}
        targets = [name for name in LM_LORA_TARGETS if name in present]
        if not targets:
            raise ValueError(f"None of {LM_LORA_TARGETS} is a module of the language model; set the LoRA targets.")
        # Regex on the LM only: the vision tower and the cross-attention blocks have their own fc1/fc2/to_q names.
        config = LoraConfig(
            r=args.lora_rank,
            lora_alpha=2 * args.lora_rank,
            target_modules=rf"language_model\..*\.({'|'.join(targets)})",
            modules_to_save=model.peft_modules_to_save(),  # Perceiver, blocks, new token rows: trained in full
        )
        model = get_peft_model(model, config)
        model.print_trainable_parameters()

    on_cpu = not torch.cuda.is_available()
    trainer_class = CPUFSDPTrainer if args.fsdp and on_cpu else FlamingoTrainer
    collator = training_collator(processor, args, max_length=args.max_length)
    trainer = trainer_class(
        model=model,
        args=training_arguments(args, on_cpu),
        train_dataset=load_training_dataset(args),
        data_collator=collator,
    )
    trainer.train(resume_from_checkpoint=resume)
    # Saves the model (the trained embedding rows written into its embedding matrix), or the LoRA adapter.
    trainer.save_model(args.output_dir)
    if trainer.args.should_save:
        processor.save_pretrained(args.output_dir)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if trainer.args.should_save:
        print(f"model: {path}\nsteps: {len(losses)}, loss: {losses[0]:.4f} -> {losses[-1]:.4f}")
        print(
            f"saved to {args.output_dir}"
            + (" (LoRA adapter: base.freeze_for_training(), then PeftModel.from_pretrained(base, folder))" * args.lora)
        )
    return {"first_loss": losses[0], "last_loss": losses[-1], "trainer": trainer}


if __name__ == "__main__":
    main()
