"""The packed bidirectional RNN over padded word ids that the language encoders share."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


def run_packed(rnn: nn.RNNBase, embedded: Tensor, words: Tensor) -> tuple[Tensor, Any]:
    """Run ``rnn`` (batch_first) over the unpadded part of each sequence.

    embedded: Tensor[B, T, E] word embeddings; words: LongTensor[B, T] word ids (0 = padding; an empty
    sequence counts as one word so the packing stays valid). Returns (outputs Tensor[B, T, H] with zeros at
    padding, the RNN's final state: h_n for a GRU, (h_n, c_n) for an LSTM, each [directions, B, hidden]).
    """
    lengths = (words != 0).sum(1).clamp(min=1)
    packed = nn.utils.rnn.pack_padded_sequence(embedded, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, state = rnn(packed)
    padded, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=words.shape[1])
    return padded, state
