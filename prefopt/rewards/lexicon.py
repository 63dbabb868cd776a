"""``lexicon``: the sum of lexicon values of the completion's words (default: the synthetic sentiment lexicon, i.e.
the synthetic task's gold reward). Higher = more positive words."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from prefopt.data.synthetic import LEXICON
from prefopt.rewards.base import (
    Reward,
    TokenScores,
    char_to_token,
    check_pairs,
    check_tokens,
    register_reward,
    token_ends,
    word_spans,
)
from prefopt.rewards.simple import lexicon_reward

_WORD_RE = re.compile(r"[a-z0-9']+")  # the word pattern of prefopt.synthetic.words (on lowercase text)


@register_reward("lexicon")
class LexiconReward(Reward):
    """Sum of ``lexicon[word]`` over the completion's lowercase words (split on whitespace and punctuation, as
    :func:`prefopt.synthetic.words`); words not in the lexicon count 0; prompt ignored. Default lexicon:
    :data:`prefopt.synthetic.LEXICON` (+1 positive, -1 negative words). Higher = more positive.

    ``token_scores``: each lexicon word's value on the token where the word ends (summed when several end on one
    token), assigned there only; words are found in ``"".join(tokens[i])``, so the token values sum to the sequence
    score when the pieces spell the completion.
    """

    def __init__(self, lexicon: Mapping[str, float] | None = None) -> None:
        self.lexicon = {str(k): float(v) for k, v in (LEXICON if lexicon is None else lexicon).items()}

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> Tensor:
        return lexicon_reward(prompts, completions, self.lexicon)

    def token_scores(
        self, prompts: Sequence[str], completions: Sequence[str], tokens: Sequence[Sequence[str]]
    ) -> TokenScores:
        check_pairs(prompts, completions)
        check_tokens(completions, tokens)
        values, assigned = [], []
        for pieces in tokens:
            value = torch.zeros(len(pieces), dtype=torch.float32)
            mask = torch.zeros(len(pieces), dtype=torch.bool)
            ends = token_ends(pieces)
            for word, _, end in word_spans("".join(pieces), _WORD_RE):
                if word in self.lexicon:
                    j = char_to_token(ends, end - 1)
                    value[j] += float(self.lexicon[word])
                    mask[j] = True
            values.append(value)
            assigned.append(mask)
        return TokenScores(values, assigned)
