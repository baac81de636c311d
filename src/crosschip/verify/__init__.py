"""`crosschip verify`: prove the served model is the trained model, and name the layer where it is not.

Two levels, as in the issue and `../shared/reference/parity-tools.md`:
  - distribution: teacher-forced KL, top-1 / top-5 agreement, perplexity ratio, greedy divergence
    (`metrics.py`, gates in `gates.py`), for any two sides (in-process checkpoints or endpoints);
  - layers: per-decoder-layer error, accumulated and isolated, against an fp32-vs-fp64 noise floor
    (`layers.py`), when both sides run in-process; `emulate.py` reproduces a target chip's numerics.
`run.py` puts them together, `report.py` writes the table, report.json and report.html.
"""
