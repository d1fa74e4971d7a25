"""The forward pass shared by jaxret's Flax encoder-decoders (T5, BART).

A subclass defines `encode`, `decode` and `logits` (and, for generation, `init_cache` and
`decode_step`); the teacher-forced forward is the same composition for every architecture.
"""

from __future__ import annotations

import flax.linen as nn
import jax


class EncoderDecoder(nn.Module):
    def __call__(
        self,
        input_ids: jax.Array,  # [B, S]
        attention_mask: jax.Array,  # [B, S]
        decoder_input_ids: jax.Array,  # [B, T]
        decoder_attention_mask: jax.Array | None = None,  # [B, T]
        deterministic: bool = True,
    ) -> jax.Array:
        """Teacher-forced forward → logits [B, T, V], fp32."""
        encoded = self.encode(input_ids, attention_mask, deterministic)
        hidden = self.decode(
            decoder_input_ids, encoded, attention_mask, decoder_attention_mask, deterministic
        )
        return self.logits(hidden)
