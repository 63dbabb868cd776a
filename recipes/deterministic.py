"""``python -m recipes.deterministic [quick=false] [run_methods=[...]] [out_dir=...]``: MPO's motivating case —
DPO, IPO and MPO trained for 20 passes over deterministically labelled pairs, KL to the reference and gold reward
evaluated along the way (``conf/recipe/deterministic.yaml``), then ``prefopt-compare`` over its runs."""

from recipes.sweep import cli

if __name__ == "__main__":
    cli("deterministic")
