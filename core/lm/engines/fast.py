"""The fast path for our GPT on a CPU: the same model with two of its layers swapped for faster
versions of themselves (as transformers' quantizers and litgpt's LoRA swap a layer), so the
readable forward pass in core/lm/model.py is the only one.

- `FastLinear` (an `nn.Linear` with the same parameters): under `torch.inference_mode()`,
  decoding's one-row products split across the CPU threads. Decoding one token multiplies a
  single row by every weight, and PyTorch's fp32 matrix-vector product runs on one core (MKL's
  sgemv), reading the weights at about half the bandwidth two cores reach. Cutting the weight's
  rows into one slice per thread (views, nothing copied) lets `bmm` multiply the slices in
  parallel: the same dot products, up to float rounding, in about half the time on two cores
  (`genai-lab bench`). Prefill and batches keep `F.linear`, already parallel. A weight stored in
  another dtype than the activations (`cast_weights`) multiplies one row cast to its dtype (the
  product is cast back); several rows (prefill) multiply the weight cast to theirs, since
  matrix-matrix products run fastest in fp32 on a CPU.
- `FusedRMSNorm`: under inference mode, one fused op (`F.rms_norm`) instead of seven; decoding
  SmolLM2 runs 61 norms per token.

Outside inference mode (training, `no_grad` rollouts) both run their parent's forward, op for op,
so installing them changes no training number. `install` swaps the classes in place (no weight
is copied; `uninstall` swaps them back); `cast_weights` stores the weights in float16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.lm.model import GPT, RMSNorm

# Below ~0.5 MB a weight sits in cache and waking the other threads costs more than it saves
# (a tutor layer is 192 x 192); SmolLM2's smallest (k/v, 192 x 576) is about the break-even.
SPLIT_MIN_WEIGHTS = 1 << 17


def inference_only() -> bool:
    """True under `torch.inference_mode()`, never while torch.compile traces (the check would
    break its graph)."""
    return not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()


class FastLinear(nn.Linear):
    """nn.Linear whose one-row products use every CPU thread, and whose weight may be stored in
    a narrower dtype than the activations (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if torch.compiler.is_compiling():  # a traced graph has no use for either, and no breaks
            return super().forward(x)
        if weight.dtype != x.dtype:
            if x.numel() == weight.shape[1] or weight.device.type != "cpu":  # one row
                y = F.linear(x.to(weight.dtype), weight).to(x.dtype)
            else:  # several rows: CPUs multiply matrices fastest in fp32 (fp16's: ~3.5x slower)
                y = F.linear(x, weight.to(x.dtype))
            return y if bias is None else y + bias
        out_features, in_features = weight.shape
        if not (
            x.numel() == in_features  # one row: a matrix-vector product
            and weight.dtype == torch.float32
            and weight.device.type == "cpu"
            and weight.numel() >= SPLIT_MIN_WEIGHTS
            and inference_only()
            and (parts := torch.get_num_threads()) > 1
            and out_features % parts == 0
        ):
            return super().forward(x)
        y = torch.bmm(  # [parts, 1, in] @ [parts, in, out/parts] -> [parts, 1, out/parts]
            x.reshape(1, 1, in_features).expand(parts, 1, in_features),
            weight.view(parts, out_features // parts, in_features).transpose(1, 2),
        ).view(*x.shape[:-1], out_features)
        return y if bias is None else y + bias


class FusedRMSNorm(RMSNorm):
    """RMSNorm as one op under inference mode (same numbers up to rounding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and inference_only():
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return super().forward(x)


SWAPS = {nn.Linear: FastLinear, RMSNorm: FusedRMSNorm}


def install(model: GPT) -> GPT:
    """Swap the model's plain nn.Linear and RMSNorm layers for their fast versions, in place
    (same parameters, same state dict; idempotent). Layers of other types (a LoRA wrapper, a
    quantized linear) are left as they are."""
    for module in model.modules():
        fast = SWAPS.get(type(module))
        if fast is not None:
            module.__class__ = fast
    return model


def uninstall(model: GPT) -> GPT:
    """The plain layers back (what training and `no_grad` code run anyway)."""
    plain = {fast: base for base, fast in SWAPS.items()}
    for module in model.modules():
        base = plain.get(type(module))
        if base is not None:
            module.__class__ = base
    return model


def installed(model: GPT) -> bool:
    return any(type(m) in (FastLinear, FusedRMSNorm) for m in model.modules())


def cast_weights(model: GPT, dtype: torch.dtype = torch.float16) -> GPT:
    """For inference only: store every linear layer's weight (and the embedding tied to the
    vocabulary head) in `dtype`, in place, with the fast layers installed; activations, norms,
    attention and the KV cache stay in the model's dtype (each product casts its input to `dtype`
    and its result back). float16 halves the weights' memory and the bytes each token reads, and
    PyTorch's float16 matrix-vector kernel accumulates in fp32 at memory speed on a CPU (bf16's
    runs slower here). float16 rather than bfloat16: the same bytes, three more mantissa bits,
    and trained weights sit far inside its range. Lossy: tests/test_decode_fast.py bounds the KL
    divergence it costs; `genai-lab bench` measures the speed."""
    if not dtype.is_floating_point:
        raise ValueError(f"cast_weights: {dtype} is not a floating-point dtype")
    install(model)
    for module in model.modules():
        if type(module) is FastLinear:
            module.weight = nn.Parameter(module.weight.detach().to(dtype), False)
    if model.config.tie_word_embeddings:
        model.model.embed_tokens.weight = model.lm_head.weight
    # A loader's tensors may share one memory-mapped weights file: copy the few left (norms,
    # biases) so nothing holds the mapping and the fp32 pages the cast read are given back.
    for param in model.parameters():
        if param.dtype != dtype:
            param.data = param.data.clone()
    return model
