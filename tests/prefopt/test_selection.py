"""ALaRM's aspect selection: switched-off aspects stay off, and keeping no aspect is said, not silent."""

import logging
from types import SimpleNamespace

import torch

from prefopt.selection import select


def words(prompts, texts):
    return torch.tensor([float(len(t.split())) for t in texts])


def fewer_words(prompts, texts):
    return -words(prompts, texts)


class Source:
    prompts = [{"prompt": f"p{i}", "prompt_ids": [i]} for i in range(8)]
    seed = 0

    def generate(self, model, prompts, k, seed):
        texts = [" ".join(["w"] * (1 + j + i % 3)) for i in range(len(prompts)) for j in range(k)]
        return {"texts": texts, "prompts": [p["prompt"] for p in prompts for _ in range(k)]}


def scorer():
    return SimpleNamespace(holistic=words, aspects={"longer": words, "shorter": fewer_words})


def test_an_aspect_configured_with_weight_zero_is_never_brought_back():
    result = select({"select_top_k": 1, "weights": {"longer": 0.0, "shorter": 2.0}}, Source(), None, scorer())
    assert result["rates"]["longer"] == 0.0  # the consistent one, but switched off by the config
    assert result["weights"] == {"longer": 0.0, "shorter": 2.0}
    kept = select({"select_top_k": 1, "weights": {"shorter": 2.0}}, Source(), None, scorer())
    assert kept["weights"] == {"longer": 1.0, "shorter": 0.0}  # unconfigured aspects weigh 1


def test_keeping_no_aspect_is_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="prefopt"):
        result = select(
            {"select_threshold": 0.5, "select_top_k": None, "weights": {"longer": 0.0}}, Source(), None, scorer()
        )
    assert result["selected"] == [] and set(result["weights"].values()) == {0.0}
    assert "kept no aspect" in caplog.text and "holistic reward alone" in caplog.text
