"""``python -m recipes.sentiment [quick=false] [run_methods=[...]] [out_dir=...]``:
the controlled-sentiment reward-vs-KL frontier of the DPO paper
(``conf/recipe/sentiment.yaml``), then ``prefopt-compare`` over its runs."""

from recipes.sweep import cli

if __name__ == "__main__":
    cli("sentiment")
