"""Method-neutral pieces of grounding models: candidate sets and the shared candidates interface
(:mod:`.candidates`), encoded queries (:mod:`.queries`) and the packed bidirectional RNN (:mod:`.rnn`)."""
