"""The README stays true: its custom-loop example runs as written, and its loss table lists every registered loss."""

import re
from pathlib import Path

import losses

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_custom_loop_example_runs_and_learns(capsys):
    block = README.split("## Using a loss in your own training loop")[1].split("```python")[1].split("```")[0]
    exec(compile(block, "README.md", "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out
    accuracy = float(re.search(r"reward accuracy ([0-9.]+)", printed).group(1))
    assert accuracy == 1.0, printed


def test_loss_table_lists_every_registered_loss():
    table = README.split("## The losses")[1].split("###")[0]
    names = set(re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.M))
    assert names == set(losses.available())
