"""Conventions every module shares: the axis-letter legend of shape-suffixed names, and the constants.

Shape-suffixed names spell an array's axes with these letters, joined by "x" (`logits_BxLxV` is
[batch, length, vocab]); docstrings write the same shapes as [B, L, V]. A digit is a literal size
(`logits_Bx3`: the three safety classes; `gate_Zx28`: the 28 generators of so(8)); before a letter it
multiplies it (`cos_BxTx2R`: [B, T, 2R], all the rotary dims). A lowercase tail tells two axes of one
kind apart (`Ds` / `Dt`, `Ys` / `Yt`: the student's / teacher's width and layers). `_` stands for axes
the code leaves unnamed (`x_BxLx_` is [B, L, ...]; `x_BxTx_xH` takes queries [B, T, Q, H] or keys
[B, T, K, H]). einsum subscripts use the same letters; a lowercase one is an axis with no letter of its
own (a second axis of one kind, a literal size), explained beside it.

    B  batch rows                         Y  layers (the stacked, scanned axis)
    L  a row's tokens (prompt + completion, the training view)
    P  prompt tokens                      N  new (generated) tokens
    M  scored positions (N + 1: the last prompt token predicts the first new one)
    T  query positions (attention)        S  key / value slots (attention, KV cache)
    C  a chunk of positions (chunked losses)
    W  chunks (the scanned axis of a chunked loss, C positions each)
    D  model width                        F  MLP width
    V  vocabulary                         E  end-of-sequence ids
    Q  query heads                        K  key / value heads
    G  query heads per key / value head   H  head dim
    R  half the rotary dims (RoPE frequencies)
    Z  8-dim blocks of the width (D / 8, SO(8) gates)
"""

IGNORE_INDEX = -100  # TRL's label for "no target here": prompts, padding, after the first EOS
SAFETY_LABELS = ("allow", "escalate", "deny")  # safety class ids 0, 1, 2; -1 = unlabelled
