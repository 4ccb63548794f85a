"""A toy attention backend: plain softmax attention in one function, with no RoPE of its own (the seam rotates q and
k for it). What adding a backend takes is a module like this one and one `ops.register_backend` line
(tests/test_attention.py registers it and trains the tiny model with it)."""

import jax
import jax.numpy as jnp


def attention(q, k, v, *, causal: bool, scale: float):
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
  if causal:
    logits = jnp.where(jnp.tril(jnp.ones(logits.shape[-2:], bool)), logits, -jnp.inf)
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)
