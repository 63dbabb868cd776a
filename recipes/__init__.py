"""Benchmark drivers (``python -m recipes.NAME [overrides]``): Hydra apps whose configs live in ``conf/recipe/``.

* ``recipes.exact`` — every pairwise loss's exact *population* fixed point on a tabular softmax policy, against the
  DPO and IPO closed forms, and the IPO/MPO overfitting argument under deterministic preferences (seconds, no model).
* ``recipes.sentiment``, ``recipes.multiobjective`` — sweeps of ``prefopt-train`` over methods x beta x seeds
  (``recipes.sweep``), compared by ``prefopt-compare``.
"""
