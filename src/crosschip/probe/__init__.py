"""Probe: record per-module statistics of a training run, compare two runs, replay a window of steps.

  record.py   hooks and the per-step recorder (`crosschip train --probe stats|tensors`)
  stats.py    the statistics, reduced on the device
  store.py    the on-disk format under <run>/probe/ and its readers
  compare.py  two recordings (runs, or ranks of runs): first divergence, first NaN/Inf origin
  ranks.py    every rank of one torchrun recording: the first rank, step and module to go wrong
  replay.py   re-run the steps before a given step from a checkpoint, dumping full tensors
"""
