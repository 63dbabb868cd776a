"""``python -m recipes.multiobjective [quick=false] [run_methods=[...]] [out_dir=...]``:
UPO and ALaRM against DPO, weighted-sum and holistic-only rewards, on every objective
(``conf/recipe/multiobjective.yaml``), then ``prefopt-compare`` over its runs."""

from recipes.sweep import cli

if __name__ == "__main__":
    cli("multiobjective")
