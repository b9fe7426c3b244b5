"""Decoding runtimes: the native decode step (:mod:`.native`) behind :func:`hf_stochact.fast_decode`."""
