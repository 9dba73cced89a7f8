"""The prior's forward on the real caption tokens only, and length-aware batching to go with it.

diffusers' `PriorTransformer.forward` always runs `num_embeddings + additional_embeddings` = 77 + 4
tokens: the 77 text positions (padding included), then the text embedding, the time embedding, the
noisy image embedding and the prediction token. Padded text positions change nothing in the result:

- every score towards a padded key gets −10000 from the padding mask (−20000 where the causal mask
  adds its own), so after softmax's max-subtraction `exp` underflows to exactly 0 (fp32, fp16 and
  bf16 alike): no query reads a padded key, and its gradient through the softmax is exactly 0 too;
- the causal mask keeps every real text token from reading later positions, and the 4 extra tokens
  come after all 77 text positions, so dropping positions L..76 leaves every kept token's inputs
  unchanged;
- only the last (prediction) token's output is used.

So for a batch padded to its longest caption L, running the L + 4 kept positions (with their own
positional embeddings, text `0..L-1` and extra `77..80`, and the matching rows/columns of the causal
mask) gives the same `predicted_image_embedding` and the same parameter gradients, for ~(L + 4) / 81
of the per-layer work (less in attention). `train.order.length_bucketed` keeps L close to each caption's own length.

DDP / accelerate: DDP's gradient hooks and accelerate's autocast hang on the *wrapped module's*
`forward`, so calling `trimmed_prior_forward(ddp.module, ...)` would bypass them. Wrap
`TrimmedPrior(prior)` instead and hand that to `accelerator.prepare`; save `unwrap_model(...).prior`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers import PriorTransformer
from torch import nn


# diffusers' additive padding-mask value (see PriorTransformer.forward); mirrored, not tuned.
PADDING_MASK_VALUE = -10000.0


def _check_supported(prior: nn.Module, encoder_hidden_states: torch.Tensor | None, attention_mask) -> None:
    """Refuse the inputs and configs for which dropping the padding would not be exact."""
    if not isinstance(prior, PriorTransformer):
        raise ValueError(
            f"expected a diffusers PriorTransformer, got {type(prior).__name__}; under DDP/accelerate wrap "
            "TrimmedPrior(prior) and prepare that, instead of passing the wrapped module here"
        )
    if encoder_hidden_states is None or attention_mask is None:
        raise ValueError(
            "the trimmed prior forward needs encoder_hidden_states and attention_mask: without a mask diffusers "
            "applies neither the padding mask nor the causal mask, so padded tokens are not inert"
        )
    if attention_mask.shape != encoder_hidden_states.shape[:2]:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} does not match encoder_hidden_states "
            f"{tuple(encoder_hidden_states.shape)} [B, L, H]"
        )
    config = prior.config
    if encoder_hidden_states.shape[1] > config.num_embeddings:
        raise ValueError(f"{encoder_hidden_states.shape[1]} text tokens > num_embeddings={config.num_embeddings}")
    if prior.positional_embedding.shape[1] != config.num_embeddings + config.additional_embeddings:
        raise ValueError("positional_embedding must cover num_embeddings + additional_embeddings positions")


def trimmed_prior_forward(
    prior: PriorTransformer,
    hidden_states: torch.Tensor,
    timestep: torch.Tensor | float | int,
    proj_embedding: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    gradient_checkpointing: bool | None = None,
) -> torch.Tensor:
    """`prior(...).predicted_image_embedding` for text padded to the batch's longest caption only.

    Mirrors `PriorTransformer.forward` (diffusers 0.42) step by step with the module's own submodules;
    the only change is which positions exist. `encoder_hidden_states` is [B, L, H] with L <= 77 and
    `attention_mask` [B, L] bool. `gradient_checkpointing=None` follows `prior.gradient_checkpointing`
    (absent in diffusers 0.42, whose PriorTransformer cannot checkpoint, hence the explicit argument).
    """
    _check_supported(prior, encoder_hidden_states, attention_mask)
    config = prior.config
    batch_size = hidden_states.shape[0]
    text_len = encoder_hidden_states.shape[1]  # L

    timesteps = timestep
    if not torch.is_tensor(timesteps):
        timesteps = torch.tensor([timesteps], dtype=torch.long, device=hidden_states.device)
    elif timesteps.ndim == 0:
        timesteps = timesteps[None].to(hidden_states.device)
    timesteps = timesteps * torch.ones(batch_size, dtype=timesteps.dtype, device=timesteps.device)  # [B]
    timesteps_projected = prior.time_proj(timesteps).to(dtype=prior.dtype)  # [B, D]
    time_embeddings = prior.time_embedding(timesteps_projected)  # [B, D]

    if prior.embedding_proj_norm is not None:
        proj_embedding = prior.embedding_proj_norm(proj_embedding)
    proj_embeddings = prior.embedding_proj(proj_embedding)  # [B, D]
    if prior.encoder_hidden_states_proj is not None:
        encoder_hidden_states = prior.encoder_hidden_states_proj(encoder_hidden_states)  # [B, L, D]
    hidden_states = prior.proj_in(hidden_states)  # [B, D]
    positional_embeddings = prior.positional_embedding.to(hidden_states.dtype)  # [1, 77 + 4, D]

    if proj_embeddings.ndim == 2:
        proj_embeddings = proj_embeddings[:, None, :]  # [B, 1, D]
    if hidden_states.ndim == 2:
        hidden_states = hidden_states[:, None, :]  # [B, 1, D]
    tokens = [encoder_hidden_states, proj_embeddings, time_embeddings[:, None, :], hidden_states]
    if prior.prd_embedding is not None:
        tokens.append(prior.prd_embedding.to(hidden_states.dtype).expand(batch_size, -1, -1))  # [B, 1, D]
    hidden_states = torch.cat(tokens, dim=1)  # [B, L + 4, D]
    num_extra = hidden_states.shape[1] - text_len
    if num_extra != config.additional_embeddings:
        raise ValueError(
            f"{num_extra} extra tokens but additional_embeddings={config.additional_embeddings}: "
            "diffusers' forward would not run this config either"
        )

    # Kept positions: text 0..L-1 and the extra tokens' own positions 77..80 (not L..L+3).
    num_text = config.num_embeddings
    positional_embeddings = torch.cat(
        [positional_embeddings[:, :text_len], positional_embeddings[:, num_text:]], dim=1
    )  # [1, L + 4, D]
    hidden_states = hidden_states + positional_embeddings  # [B, L + 4, D]

    causal = prior.causal_attention_mask  # [1, 81, 81]
    device = causal.device
    keep = torch.cat(
        [torch.arange(text_len, device=device), torch.arange(num_text, num_text + num_extra, device=device)]
    )  # [L + 4]
    causal = causal[:, keep][:, :, keep]  # [1, L + 4, L + 4]
    attention_mask = (1 - attention_mask.to(hidden_states.dtype)) * PADDING_MASK_VALUE  # [B, L]
    attention_mask = F.pad(attention_mask, (0, num_extra), value=0.0)  # [B, L + 4]
    attention_mask = (attention_mask[:, None, :] + causal).to(hidden_states.dtype)  # [B, L + 4, L + 4]
    attention_mask = attention_mask.repeat_interleave(
        config.num_attention_heads, dim=0, output_size=attention_mask.shape[0] * config.num_attention_heads
    )  # [B * heads, L + 4, L + 4]

    if prior.norm_in is not None:
        hidden_states = prior.norm_in(hidden_states)

    if gradient_checkpointing is None:
        gradient_checkpointing = getattr(prior, "gradient_checkpointing", False)
    checkpoint = getattr(prior, "_gradient_checkpointing_func", None) or partial(
        torch.utils.checkpoint.checkpoint, use_reentrant=False
    )
    for block in prior.transformer_blocks:
        if gradient_checkpointing and torch.is_grad_enabled():
            hidden_states = checkpoint(block, hidden_states, attention_mask)
        else:
            hidden_states = block(hidden_states, attention_mask=attention_mask)  # [B, L + 4, D]

    hidden_states = prior.norm_out(hidden_states)
    if prior.prd_embedding is not None:
        hidden_states = hidden_states[:, -1]  # [B, D]
    else:
        hidden_states = hidden_states[:, text_len + proj_embeddings.shape[1] + 1 :]  # [B, 1, D]
    return prior.proj_to_clip_embeddings(hidden_states)  # [B, E]


class TrimmedPrior(nn.Module):
    """The prior as one module whose `forward` is the trimmed (or the exact 77-token) forward.

    Exists for DDP/accelerate: they hook the prepared module's `forward` (gradient sync, autocast).
    Parameters are the prior's own, so EMA and optimizers over `prior.parameters()` are unchanged.
    `trim_padding=False` pads to 77 and runs diffusers' own forward (with checkpointing, which that
    forward lacks in diffusers 0.42, it runs `trimmed_prior_forward` on the 77-padded batch instead).
    """

    def __init__(self, prior: PriorTransformer, trim_padding: bool = True, gradient_checkpointing: bool = False):
        super().__init__()
        self.prior = prior
        self.trim_padding = trim_padding
        self.gradient_checkpointing = gradient_checkpointing

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float | int,
        proj_embedding: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        if not self.trim_padding:
            missing = self.prior.config.num_embeddings - encoder_hidden_states.shape[1]
            encoder_hidden_states = F.pad(encoder_hidden_states, (0, 0, 0, missing))  # [B, 77, H]
            attention_mask = F.pad(attention_mask, (0, missing), value=False)  # [B, 77]
            if not self.gradient_checkpointing:
                return self.prior(
                    hidden_states, timestep, proj_embedding, encoder_hidden_states, attention_mask
                ).predicted_image_embedding
        return trimmed_prior_forward(
            self.prior,
            hidden_states,
            timestep,
            proj_embedding,
            encoder_hidden_states,
            attention_mask,
            gradient_checkpointing=self.gradient_checkpointing,
        )


def pad_to_longest(
    sequences: Sequence[np.ndarray | torch.Tensor], length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack [L_i, H] caption hidden states into ([B, Lmax, H] zero-padded, [B, Lmax] bool mask).

    `length` pads to a fixed length instead (e.g. 77 for the untrimmed forward).
    """
    tensors = [torch.as_tensor(s) for s in sequences]
    lengths = torch.tensor([t.shape[0] for t in tensors])  # [B]
    hidden = nn.utils.rnn.pad_sequence(tensors, batch_first=True)  # [B, Lmax, H]
    if length is not None:
        if length < hidden.shape[1]:
            raise ValueError(f"cannot pad {hidden.shape[1]} tokens to {length}")
        hidden = F.pad(hidden, (0, 0, 0, length - hidden.shape[1]))  # [B, length, H]
    mask = torch.arange(hidden.shape[1])[None, :] < lengths[:, None]  # [B, Lmax]
    return hidden, mask
