"""``python -m recipes.alarm [quick=false] [run_methods=[...]] [out_dir=...]``: ALaRM's hierarchical reward against
its weighted-sum, holistic-only and aspect-only baselines on a task whose aspect can be gamed at the holistic reward's
expense (``conf/recipe/alarm.yaml``), then ``prefopt-compare`` over its runs."""

from recipes.sweep import cli

if __name__ == "__main__":
    cli("alarm")
