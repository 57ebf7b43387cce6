"""Block-wise reconstruction (EfficientQAT's Block-AP): before end-to-end training, each decoder
block of the student is trained alone to reproduce the teacher's block output on cached inputs.

For block ``i`` = 0 … L−1, over the calibration batches:

- the target is the teacher's block ``i`` applied to the teacher's own stream (the teacher's
  block-``i`` inputs: its embeddings run through its blocks 0 … i−1);
- the student's block ``i`` gets the student's stream (the student's embeddings run through its
  blocks 0 … i−1 *after* their reconstruction, as EfficientQAT does);
- only block ``i``'s parameters train (AdamW, ``steps`` steps cycling over the batches) on the
  mean squared error between the two outputs, padding excluded: float weights of
  :class:`~hf_sdft.compress.fake_quant.FakeQuantLinear` layers (straight-through rounding), their
  learned scales and shifts when they have them (at ``lr × scales_lr_ratio``), norms, biases.
  Pruned weights are zeroed again after every step (``masks``, exact zeros kept).

The inputs of the blocks (block 0's hidden states, and whatever else the model passes each
block: attention mask, position embeddings…) are captured once with forward pre-hooks and replayed;
only one block's activations are held at a time (per batch: the student's and the teacher's
block inputs and the teacher's block outputs, ``batch × tokens × hidden`` each). The models stay
where they are (no offloading): on one device the memory is the two models plus those three.

Refused: PEFT-wrapped students (train the adapters end to end instead) and quanto layers
(quantized activations or frozen integer weights), whose rounding has no gradient here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_sdft.compress.calibration import StopForward
from hf_sdft.compress.fake_quant import SCALES_LR_RATIO, FakeQuantLinear, scale_group, split_scale_parameters
from hf_sdft.compress.prune import pruned_weights, zero_pruned
from hf_sdft.modeling import decoder_layers, is_peft, unwrap


def _block_output(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def check_reconstructible(student: nn.Module) -> None:
    """Raise when ``student`` cannot be reconstructed block by block (see the module docstring)."""
    # lazy: quantize.py imports optimum-quanto (every quanto call stays there), needed only here
    from hf_sdft.compress.quantize import quantized_modules

    if is_peft(student):
        raise ValueError("block reconstruction trains the student's own weights: it cannot run on a PEFT-wrapped "
                         "student (its base is frozen under the adapters); turn block_reconstruction off")
    quanto = [name for name, m in quantized_modules(unwrap(student)).items() if not isinstance(m, FakeQuantLinear)]
    if quanto:
        raise ValueError(f"block reconstruction needs weight-only fake quantization (FakeQuantLinear); {quanto[0]} "
                         f"and {len(quanto) - 1} more are quanto layers (quantized activations or frozen integer "
                         "weights) whose rounding has no gradient: turn block_reconstruction off")


@torch.no_grad()
def block_inputs(model: nn.Module, batches: Sequence[dict]) -> list[tuple[torch.Tensor, list[dict]]]:
    """Per batch, decoder block 0's hidden-state input and, for every block, the other keyword
    arguments the model passes it (attention mask — per block, as models mixing sliding-window and
    full attention differ —, position embeddings…), from one forward stopped before the last
    block runs (no output head). The keyword tensors are the model's own, shared between blocks."""
    model = unwrap(model)
    blocks = decoder_layers(model)
    device = next(model.parameters()).device
    captured: list[tuple[torch.Tensor, list[dict]]] = []
    current: dict = {}

    def hook_for(i: int):
        def hook(_module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if len(args) > 1:
                raise ValueError(f"{type(blocks[i]).__name__} takes {len(args)} positional inputs: only the hidden "
                                 "states are replayed positionally")
            if i == 0:
                current["hidden"] = hidden.detach()
            current.setdefault("kwargs", []).append(kwargs)
            if i == len(blocks) - 1:
                raise StopForward

        return hook

    handles = [block.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            current.clear()
            try:
                model(input_ids=torch.as_tensor(batch["input_ids"], device=device),
                      attention_mask=None if mask is None else torch.as_tensor(mask, device=device), use_cache=False)
            except StopForward:
                pass
            if len(current.get("kwargs", ())) != len(blocks):
                raise ValueError(f"{type(model).__name__}'s forward called {len(current.get('kwargs', ()))} of its "
                                 f"{len(blocks)} decoder blocks once each: cannot replay them one by one")
            captured.append((current["hidden"], current["kwargs"]))
    finally:
        for h in handles:
            h.remove()
    return captured


def teacher_outputs(teacher: nn.Module, batches: Sequence[dict]):
    """Yields, for each decoder block in turn, its outputs over ``batches`` (one tensor per batch)
    on the teacher's own stream; only the current block's inputs and outputs are held."""
    stream = block_inputs(teacher, batches)
    for i, block in enumerate(decoder_layers(teacher)):
        with torch.no_grad():
            outputs = [_block_output(block(x, **kws[i])) for x, kws in stream]
        yield outputs
        stream = [(y, kws) for y, (_, kws) in zip(outputs, stream)]


def _mse(output: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    diff = (output.float() - target.to(output.device, torch.float32)).pow(2)
    if keep is None:
        return diff.mean()
    keep = keep.to(diff.device)
    return diff[keep].mean()


def reconstruct_blocks(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[dict],
    steps: int = 50,
    lr: float = 1e-4,
    masks: dict[str, torch.Tensor] | None = None,
    scales_lr_ratio: float = SCALES_LR_RATIO,
    progress: bool | None = None,
) -> dict:
    """Reconstruct ``student``'s decoder blocks one after the other on the teacher's block outputs
    (see the module docstring); ``batches`` are model-input dicts (``input_ids``, optional
    ``attention_mask``), ``masks`` the keep-masks of a pruned student (``{module name: mask}``,
    as :func:`~hf_sdft.compress.prune.prune` returns). Trains ``student`` in place.

    Returns ``{"steps", "lr", "batches", "mse_before": [per block], "mse_after": [per block]}``:
    each block's mean squared error to the teacher's output on its student-stream inputs, before
    and after its ``steps`` steps (the same batches as the training; no held-out data).
    ``progress``: a progress bar over the blocks (None: tqdm's choice, on a terminal only)."""
    check_reconstructible(student)
    if not batches:
        raise ValueError("block reconstruction needs calibration batches")
    if steps < 1:
        raise ValueError(f"block reconstruction steps={steps} must be at least 1")
    s_blocks, t_blocks = decoder_layers(student), decoder_layers(teacher)
    if len(s_blocks) != len(t_blocks):
        raise ValueError(f"the student has {len(s_blocks)} decoder blocks and the teacher {len(t_blocks)}")
    keeps = [None if b.get("attention_mask") is None else torch.as_tensor(b["attention_mask"]).bool()
             for b in batches]
    pruned = pruned_weights(student, masks) if masks else []
    was_training, grads = student.training, {p: p.requires_grad for p in student.parameters()}
    teacher_training = teacher.training
    student.eval()
    teacher.eval()
    s_stream = block_inputs(student, batches)
    report = {"steps": steps, "lr": lr, "batches": len(batches), "mse_before": [], "mse_after": []}
    try:
        student.requires_grad_(False)
        disable = None if progress is None else not progress
        walk = enumerate(zip(s_blocks, teacher_outputs(teacher, batches)))
        for i, (block, targets) in tqdm(walk, total=len(s_blocks), desc="block reconstruction", leave=False,
                                   disable=disable):

            def errors() -> float:
                with torch.no_grad():
                    return sum(float(_mse(_block_output(block(x, **kws[i])), y, k))
                               for (x, kws), y, k in zip(s_stream, targets, keeps)) / len(batches)

            report["mse_before"].append(errors())
            block.requires_grad_(True)
            rest, scales = split_scale_parameters((n, p) for n, p in block.named_parameters() if p.is_floating_point())
            groups = [{"params": rest, "lr": lr}]
            if scales:
                groups.append(scale_group(scales, lr, scales_lr_ratio))
            optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
            for step in range(steps):
                j = step % len(batches)
                x, kws = s_stream[j]
                loss = _mse(_block_output(block(x, **kws[i])), targets[j], keeps[j])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                zero_pruned(pruned)
            optimizer.zero_grad(set_to_none=True)
            del optimizer
            block.requires_grad_(False)
            report["mse_after"].append(errors())
            with torch.no_grad():  # the next block's inputs: the reconstructed block's outputs
                s_stream = [(_block_output(block(x, **kws[i])).detach(), kws) for x, kws in s_stream]
            del targets
    finally:
        for p, flag in grads.items():
            p.requires_grad_(flag)
        student.train(was_training)
        teacher.train(teacher_training)
    return report
