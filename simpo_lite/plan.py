"""`simpo-lite plan`: estimated peak GPU memory of a run, before loading anything.

The estimate follows what simpo-lite's own code path keeps alive, term by term:

- base weights: every decoder linear layer in NF4 (half a byte per weight) plus its quantization
  constants; embeddings, output head and norms unquantized;
- LoRA adapters: fp32 weights, fp32 gradients and the optimizer's state;
- activations: with non-reentrant gradient checkpointing one hidden-state tensor per layer per token,
  plus one layer's full activations while it is recomputed in backward;
- log-probs: one [chunk_tokens, vocab] float32 buffer, reused in place for the softmax and its
  gradient (simpo_lite.logprobs never builds [2B, L, vocab]); a trainer that builds [2B, L, vocab]
  float32 logits and their log-softmax is shown beside, for comparison;
- CUDA context and allocator slack.

The recomputed layer and the log-prob chunk are never alive at the same time (the chunk belongs to
the forward pass, the recompute to the backward pass): see Estimate for how the peak is combined.
The estimate assumes every row is padded to data.max_length and is all response: the worst batch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from simpo_lite.config import Config
from simpo_lite.errors import UserError
from simpo_lite.plan_arch import ALIASES, KNOWN_ARCHS, Arch, arch_from_hf_config, architecture  # noqa: F401

GIB = 2**30

# CUDA context (driver, cuBLAS/cuDNN handles and workspaces): outside torch's allocator, typically
# 0.3-0.6 GiB on current GPUs and drivers; the upper end is used so the plan errs towards fitting less.
CUDA_CONTEXT_BYTES = 0.5 * GIB
# torch's caching allocator reserves more than it hands out (block rounding, fragmentation between
# differently sized activations); reserved/allocated of 1.05-1.15 is usual for training loops.
ALLOCATOR_SLACK = 0.10

NF4_BYTES = 0.5
QUANT_BLOCK = 64          # bitsandbytes NF4 block size: one absmax per 64 weights
DOUBLE_QUANT_BLOCK = 256  # double quantization: the absmaxes are themselves 8-bit, one fp32 scale per 256


@dataclass(frozen=True)
class Setting:
    """Everything besides the architecture that decides memory: a resolved config on a device."""

    micro_batch: int        # preference pairs per forward (2 x micro_batch rows); with pack_tokens, rows
    seq_len: int            # tokens per row (data.max_length: the worst case)
    lora_r: int
    lora_dropout: bool
    lora_targets: tuple[str, ...]
    quantize: bool
    double_quant: bool
    compute_bytes: int      # matmul dtype: bf16/fp16 = 2, fp32 = 4
    residual_bytes: int     # dtype of the hidden states between layers, embeddings and head
    autocast: bool          # mixed precision on CUDA: matmuls cast their inputs to the compute dtype
    optimizer_state_bytes: int
    optimizer: str
    gradient_checkpointing: bool
    uncheckpointed_layers: int  # with checkpointing, the last n layers keep their activations
    eager_attention: bool   # the eager kernel builds [rows, heads, L, L] score tensors
    chunk_tokens: int
    cuda: bool
    fsdp_processes: int = 1  # FSDP over this many GPUs (plan_fsdp.py); 1: the whole model on each GPU
    lora_layer_count: int | None = None  # lora.layers: adapters on this many decoder layers; None: on all
    pack_prompt: bool = False  # simpo.pack_prompt: one [prompt | chosen | rejected] row per pair
    pack_tokens: int = 0       # simpo.pack_tokens: micro_batch rows of up to this many tokens, pairs as fit
    # The full-logits trainer's layers instead of simpo-lite's: transformers' own norms and MLP, peft's LoRA path.
    peer: bool = False

    @property
    def rows(self) -> int:
        return self.micro_batch if self.pack_prompt else 2 * self.micro_batch

    @property
    def row_len(self) -> int:
        """The longest row: a packed pair at its longest is 2 x seq_len tokens (less its prompt), and
        one over the pack_tokens budget gets a row of its own."""
        if not self.pack_prompt:
            return self.seq_len
        return max(self.pack_tokens, 2 * self.seq_len)

    @property
    def tokens(self) -> int:
        return self.rows * self.row_len


LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def setting_from_config(cfg: Config, device: str = "cuda") -> Setting:
    """How a run of `cfg` would use memory on `device` ('cuda' = the GPU it is planned for, 'cpu')."""
    cuda = device == "cuda"
    compute = {"bf16": 2, "fp16": 2, "fp32": 4}.get(cfg.model.compute_dtype)
    if compute is None:  # auto, as simpo_lite.model.compute_dtype resolves it
        from simpo_lite.model import cpu_has_native_bf16

        compute = 2 if cuda or cpu_has_native_bf16() else 4
    import torch

    from simpo_lite.model import keeps_fp32_frozen_weights

    # With fp32 embeddings, head and norms (model.frozen_dtype) the residual stream is fp32 too.
    compute_dtype = torch.bfloat16 if compute == 2 else torch.float32
    residual = 4 if keeps_fp32_frozen_weights(cfg.model, compute_dtype) else compute
    from simpo_lite.optim import optimizer_name

    optimizer = optimizer_name(cfg.train.optimizer, cuda)
    targets = tuple(LINEAR_NAMES) if cfg.lora.target_modules == ["all-linear"] else tuple(cfg.lora.target_modules)
    return Setting(micro_batch=cfg.train.micro_batch_size, seq_len=cfg.data.max_length, lora_r=cfg.lora.r,
                   lora_dropout=cfg.lora.dropout > 0, lora_targets=targets, quantize=cfg.model.quantize,
                   double_quant=cfg.model.double_quant, compute_bytes=compute, residual_bytes=residual,
                   autocast=cuda and compute == 2 and cfg.train.mixed_precision != "no",
                   # paged 8-bit AdamW: two 8-bit moments per parameter; torch AdamW: two fp32 moments.
                   optimizer_state_bytes=2 if optimizer == "paged_adamw_8bit" else 8, optimizer=optimizer,
                   gradient_checkpointing=cfg.model.gradient_checkpointing,
                   # `auto` not resolved yet (simpo_lite.autofit fits it from this): every layer recomputed.
                   uncheckpointed_layers=0 if cfg.model.uncheckpointed_layers == "auto" else cfg.model.uncheckpointed_layers,
                   eager_attention=cfg.model.attn_implementation == "eager",
                   chunk_tokens=cfg.simpo.logp_chunk_tokens, cuda=cuda,
                   lora_layer_count=None if cfg.lora.layers is None else len(set(cfg.lora.layers)),
                   pack_prompt=cfg.simpo.pack_prompt, pack_tokens=cfg.simpo.pack_tokens)


def linear_shapes(arch: Arch) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer of one decoder layer."""
    q_out, kv_out = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    return {"q_proj": (arch.hidden, q_out), "k_proj": (arch.hidden, kv_out), "v_proj": (arch.hidden, kv_out),
            "o_proj": (q_out, arch.hidden), "gate_proj": (arch.hidden, arch.intermediate),
            "up_proj": (arch.hidden, arch.intermediate), "down_proj": (arch.intermediate, arch.hidden)}


def lora_params(arch: Arch, s: Setting) -> int:
    shapes = linear_shapes(arch)
    unknown = [t for t in s.lora_targets if t not in shapes]
    if unknown:
        raise UserError(f"plan: lora.target_modules {list(unknown)} are not linear layers plan knows "
                        f"({', '.join(shapes)}); use those names or ['all-linear']")
    layers = arch.layers if s.lora_layer_count is None else min(s.lora_layer_count, arch.layers)
    return layers * sum(s.lora_r * (shapes[t][0] + shapes[t][1]) for t in s.lora_targets)


def weight_bytes(arch: Arch, s: Setting) -> tuple[float, float]:
    """(decoder linear weights, unquantized weights: embeddings, head, norms)."""
    linear = arch.layers * sum(i * o for i, o in linear_shapes(arch).values())
    if s.quantize:
        # One absmax per 64-weight block: fp32, or with double quantization 8-bit plus an fp32 scale
        # per 256 blocks.
        constants = (1 / QUANT_BLOCK + 4 / (QUANT_BLOCK * DOUBLE_QUANT_BLOCK)) if s.double_quant else 4 / QUANT_BLOCK
        quantized = linear * (NF4_BYTES + constants)
    else:
        quantized = linear * s.compute_bytes
    embeddings = arch.vocab * arch.hidden * (1 if arch.tied_embeddings else 2)
    norms = arch.hidden * (arch.norms_per_layer * arch.layers + 1)
    return quantized, (embeddings + norms) * s.residual_bytes


def layer_activation_bytes_per_token(arch: Arch, s: Setting) -> float:
    """Bytes per token that one decoder layer's forward keeps for its backward.

    Counted from what autograd saves in a Llama-style layer whose linears are 4-bit with LoRA
    (benchmarks/layer_memory.py measures it):
    - each RMSNorm keeps its input as it comes and an fp32 scale per token (simpo_lite.lean_layers;
      transformers' own keeps an fp32 copy of the input);
    - the inputs of the linears, once each: the two norm outputs (q, k, v and gate, up share them),
      the attention output and the MLP product. bitsandbytes' 4-bit matmul keeps none of them; the
      LoRA adapters keep them, once, in the residual stream's dtype (simpo_lite.lora_inputs);
    - a LoRA adapter also keeps its rank-r intermediate (its dropout mask is drawn again from a seed).
      peft's path (s.peer) keeps, per adapter, its dropout mask (a bool on a GPU, the fp32 noise on the
      CPU) and its own copy of the input: the dropped one, or one cast to its weights' dtype;
    - attention keeps q, k, v (k and v repeated to every head: the padded batch carries a mask, so
      sdpa cannot use grouped-query kernels), its output and the softmax log-sum-exp;
    - the gated MLP keeps gate and up (lean_layers computes silu(gate) again; transformers' own keeps it too).
    """
    R, C = s.residual_bytes, s.compute_bytes
    attn = C if s.autocast else R            # sdpa runs in the compute dtype under autocast
    lora_mid = C if s.autocast else 4        # adapter weights are fp32; under autocast they run in C
    lean = arch.lean_layers and not s.peer
    q_out, H, I = arch.heads * arch.head_dim, arch.hidden, arch.intermediate
    inputs = {"q_proj": R, "k_proj": R, "v_proj": R, "o_proj": attn, "gate_proj": R, "up_proj": R, "down_proj": R}
    norm = R * H + 4 if lean else 4 * H
    total = arch.norms_per_layer * norm
    for name, (d_in, _) in linear_shapes(arch).items():
        if name in s.lora_targets:
            total += s.lora_r * lora_mid
            if s.peer and s.lora_dropout:
                total += (1 if s.cuda else 4) * d_in
            if s.peer and (s.lora_dropout or lora_mid != inputs[name]):
                total += lora_mid * d_in  # the adapter's own copy; the input it was made from is not kept
                inputs[name] = 0
    # The inputs of the linears, each kept once: q, k, v share one, gate and up another.
    total += inputs["q_proj"] * H + inputs["gate_proj"] * H + inputs["o_proj"] * q_out + inputs["down_proj"] * I
    total += 4 * q_out * attn + 4 * arch.heads  # q, k, v, output; log-sum-exp
    total += (2 if lean else 3) * R * I  # gate, up (and activation(gate))
    return total


def attention_score_bytes(arch: Arch, s: Setting) -> float:
    """Eager attention's [rows, heads, L, L] tensors for one layer (zero for sdpa/flash kernels, and for
    packed rows, which attend segment by segment with SDPA whatever the model's kernel)."""
    if not s.eager_attention or s.pack_prompt:
        return 0.0
    C = s.compute_bytes
    # fp32 softmax output, its cast to the compute dtype, the raw scores; the soft cap keeps one more.
    per_score = 4 + 2 * C + (C if arch.attn_softcap else 0)
    return s.rows * arch.heads * s.row_len * s.row_len * per_score


def packed_mask_bytes(s: Setting) -> float:
    """Segment attention needs no mask, and for sdpa and flash kernels transformers builds none; for an
    eager model it still builds an additive [rows, 1, T, T] one in the embeddings' dtype, alive from the
    first layer's forward to the last layer's backward."""
    return s.rows * s.row_len * s.row_len * s.residual_bytes if s.pack_prompt and s.eager_attention else 0.0


@dataclass
class Estimate:
    """Bytes by component for one micro-batch size, and the peak they add up to.

    Alive all the time: weights, LoRA weights and optimizer state. On top, the larger of
    - the forward pass's end: every checkpoint, the decoder's outputs and one log-prob chunk, and
    - the backward pass: one recomputed layer, plus the checkpoints not yet consumed and the LoRA
      gradients made so far; the first shrink as the second grow, so the larger of the two counts.
    """

    setting: Setting
    base_weights: float
    unquantized_weights: float
    lora_params: int
    lora_weights_and_states: float
    lora_grads: float
    checkpoints: float
    backward_checkpoints: float  # what of `checkpoints` is still alive when backward recomputes a layer
    decoder_io: float
    layer_recompute: float
    logp_chunk: float
    full_logits: float
    cuda_context: float
    fsdp_gathered: float = 0.0  # FSDP: the unsharded copies alive during a step (plan_fsdp.py)

    def persistent(self) -> float:
        return self.base_weights + self.unquantized_weights + self.lora_weights_and_states + self.fsdp_gathered

    def forward_phase(self, full_logits: bool = False) -> float:
        return self.checkpoints + self.decoder_io + (self.full_logits if full_logits else self.logp_chunk)

    def backward_phase(self) -> float:
        return self.decoder_io + self.layer_recompute + max(self.backward_checkpoints, self.lora_grads)

    def tensors(self, full_logits: bool = False) -> float:
        """Peak bytes of live tensors (what torch.cuda.max_memory_allocated reports)."""
        return self.persistent() + max(self.forward_phase(full_logits), self.backward_phase())

    def overhead(self, full_logits: bool = False) -> float:
        if not self.setting.cuda:
            return 0.0
        return self.cuda_context + ALLOCATOR_SLACK * self.tensors(full_logits)

    def peak(self, full_logits: bool = False) -> float:
        """Peak device memory including the CUDA context and allocator slack (what nvidia-smi shows)."""
        return self.tensors(full_logits) + self.overhead(full_logits)


def logp_chunk_bytes(arch: Arch, s: Setting) -> float:
    """simpo_lite.logprobs' working set for one chunk of response tokens.

    One [chunk, vocab] float32 buffer holds the logits, then exp(logits - max), then the gradient, all
    in place. Beside it, briefly: the head's compute-dtype output before its fp32 copy (or, under
    autocast, the gradient's cast for the matmul back to hidden size), and with a logit soft cap a
    second fp32 buffer (tanh is kept for its derivative). Under autocast an fp32 head weight is also
    cast to the compute dtype for each matmul: frozen weights are not in autocast's cast cache.
    """
    chunk = min(s.chunk_tokens, s.tokens)
    per_logit = 4 + (s.compute_bytes if s.compute_bytes != 4 else 0) + (4 if arch.logit_softcap else 0)
    head_cast = arch.vocab * arch.hidden * s.compute_bytes if (s.autocast and s.residual_bytes != s.compute_bytes) else 0
    return chunk * arch.vocab * per_logit + head_cast


def estimate(arch: Arch, s: Setting) -> Estimate:
    T, H, R = s.tokens, arch.hidden, s.residual_bytes
    base, unquantized = weight_bytes(arch, s)
    n_lora = lora_params(arch, s)
    per_layer = layer_activation_bytes_per_token(arch, s) * T + attention_score_bytes(arch, s)
    # Backward through a layer also holds the gradients of its widest activations (MLP-wide, two at a
    # time), and 4-bit matmuls dequantize one weight matrix to the compute dtype at a time.
    working = 2 * T * arch.intermediate * R + max(i * o for i, o in linear_shapes(arch).values()) * s.compute_bytes
    if s.gradient_checkpointing:
        recomputed = max(arch.layers - s.uncheckpointed_layers, 0)
        checkpoints = recomputed * T * H * R + (arch.layers - recomputed) * per_layer
        # The uncheckpointed layers are the last ones: backward frees them before it recomputes any.
        backward_checkpoints = recomputed * T * H * R
        recompute = per_layer + working
    else:
        checkpoints = backward_checkpoints = arch.layers * per_layer
        recompute = working
    # After the decoder: the final norm's fp32 input and its output, and the log-prob code's gathered
    # response hidden states plus their gradient ([response tokens, H] each; response tokens <= T); for
    # packed rows, their attention mask throughout.
    decoder_io = T * H * (4 + R) + 2 * T * H * R + packed_mask_bytes(s)
    # A trainer that keeps [2B, L, vocab] logits in float32 and their float32 log-softmax for backward.
    full_logits = T * arch.vocab * (4 + 4)
    est = Estimate(setting=s, base_weights=base, unquantized_weights=unquantized, lora_params=n_lora,
                    lora_weights_and_states=n_lora * (4 + s.optimizer_state_bytes), lora_grads=n_lora * 4,
                    checkpoints=checkpoints, backward_checkpoints=backward_checkpoints, decoder_io=decoder_io,
                    layer_recompute=recompute,
                    logp_chunk=logp_chunk_bytes(arch, s), full_logits=full_logits,
                    cuda_context=CUDA_CONTEXT_BYTES if s.cuda else 0.0)
    if s.fsdp_processes > 1:
        from simpo_lite.plan_fsdp import sharded

        est = sharded(est, arch)
    return est


def largest_micro_batch(arch: Arch, s: Setting, budget: float, full_logits: bool = False, limit: int = 4096) -> int:
    """The most pairs per micro-batch whose estimated peak fits `budget` bytes (0 if not even one); with
    full_logits, for the full-logits trainer (its logits and its layers)."""
    s = replace(s, peer=full_logits)
    fits = lambda b: estimate(arch, replace(s, micro_batch=b)).peak(full_logits) <= budget  # noqa: E731
    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:  # the peak grows with the batch, so bisect
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def largest_max_length(arch: Arch, s: Setting, budget: float, step: int = 64) -> int:
    """The longest data.max_length (a multiple of `step`, at most the configured one) at which one pair
    fits `budget` bytes; 0 if not even `step` tokens do."""
    fits = lambda n: estimate(arch, replace(s, micro_batch=1, seq_len=n * step)).peak() <= budget  # noqa: E731
    low, high = 0, s.seq_len // step + 1  # fits(low) holds (or low is 0), fits(high) is not known to
    if fits(high - 1):
        return (high - 1) * step
    high -= 1
    while high - low > 1:  # the peak grows with the length, so bisect
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low * step


def most_uncheckpointed_layers(arch: Arch, s: Setting, budget: float) -> int:
    """The most decoder layers that can keep their activations (model.uncheckpointed_layers) within
    `budget` at this micro-batch; 0 without gradient checkpointing or when nothing more fits."""
    if not s.gradient_checkpointing:
        return 0
    fits = [n for n in range(arch.layers + 1) if estimate(arch, replace(s, uncheckpointed_layers=n)).peak() <= budget]
    return max(fits, default=0)


def batch_suggestion(effective: int, fit: int) -> tuple[int, int]:
    """(micro_batch, accumulation): the largest micro-batch <= fit that divides the effective batch."""
    micro = max(b for b in range(1, min(fit, effective) + 1) if effective % b == 0)
    return micro, effective // micro


def default_budget() -> tuple[float, str]:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return float(props.total_memory), f"{props.name}, {props.total_memory / GIB:.1f} GiB"
    return 24.0 * GIB, "no GPU here: planning for a 24 GiB consumer GPU (set --gpu-memory)"


def plan_summary(cfg: Config, device: str = "cuda") -> dict:
    """The estimate as plain numbers (bytes), for tests and scripts."""
    from simpo_lite.plan_report import breakdown_rows

    arch = architecture(cfg.model)
    s = setting_from_config(cfg, device)
    est = estimate(arch, s)
    return {"tensors": est.tensors(), "peak": est.peak(), "full_logits_peak": estimate(arch, replace(s, peer=True)).peak(True),
            "persistent": est.persistent(), "step": est.tensors() - est.persistent(),
            "forward_phase": est.forward_phase(), "backward_phase": est.backward_phase(),
            "components": {name: ours for name, ours, _ in breakdown_rows(arch, est)}}


__all__ = ["Arch", "KNOWN_ARCHS", "Setting", "Estimate", "architecture", "setting_from_config", "estimate",
           "largest_micro_batch", "largest_max_length", "batch_suggestion", "plan_summary"]
