"""The benchmark harness behind the performance tables (`make bench`, `python scripts/bench`).

One module per section (peak, throughput, e2e, augment, ablation, vs_lightly, e2e_lightly, mae),
the training step they time (`measure`), the configurations they compose (`configs`), FLOP
counting (`flops`) and the shared timing, memory and table helpers (`common`); `__main__` is the
command line.
"""
