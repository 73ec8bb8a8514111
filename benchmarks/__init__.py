"""fastbert's benchmark suite: `python -m benchmarks [--quick] [--only ops|model] [--out DIR]`.

counting.py  FLOP and byte formulas         harness.py  timing, interleaving, CSV rows
providers.py the alternatives to fastbert   suite.py    shapes per device, op cases
models.py    whole-model cases              report.py   ratio table and plots
"""
