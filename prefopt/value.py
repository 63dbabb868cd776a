"""A value function V(x) of the prompt fit by expectile regression: UPO's ``value_head`` baseline.

The paper's advantages come from a value network fit by expectile regression on the offline data (as in IQL). Here
V is a small head (linear, or one tanh hidden layer) on frozen prompt features — the initial policy's last hidden
state at the prompt's last token, computed once before training — fit to minimise the expectile loss
``mean |τ − 1{r < V(x)}|·(r − V(x))²`` over the training completions' combined auxiliary rewards. Unlike the per-prompt
table (``prompt_expectile``), which needs every prompt to recur, the head shares strength between prompts and gives
an unseen prompt a value.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from losses._common import expectile

__all__ = ["expectile_loss", "prompt_features", "ExpectileValue"]


def expectile_loss(prediction: Tensor, target: Tensor, tau: float) -> Tensor:
    """``mean |τ − 1{target < prediction}|·(target − prediction)²``: its minimiser over a constant is the τ-expectile
    of ``target`` (the mean at τ = 0.5)."""
    diff = target - prediction
    weight = torch.where(diff < 0, 1.0 - tau, tau)
    return (weight * diff.square()).mean()


@torch.no_grad()
def prompt_features(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], pad_id: int, batch_size: int, device: torch.device
) -> Tensor:
    """[N, H] float32: the model's last hidden state at each prompt's last token (right-padded batches through the
    decoder only, no LM head)."""
    decoder = getattr(model, "base_model", model)
    was_training = decoder.training
    decoder.eval()
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, : len(p)] = torch.as_tensor(list(p))
                mask[i, : len(p)] = 1
            hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            last = (mask.sum(dim=1) - 1).to(device)
            out.append(hidden[torch.arange(len(chunk), device=device), last].float().cpu())
    finally:
        decoder.train(was_training)
    return torch.cat(out)


class ExpectileValue:
    """V(x) = head(standardised features): linear (``hidden=0``) or ``Linear → tanh → Linear``; fit by full-batch
    Adam on the expectile loss from a seeded initialisation, so the same data always gives the same head."""

    def __init__(self, tau: float, hidden: int = 32, steps: int = 300, lr: float = 1e-2, weight_decay: float = 0.0):
        self.tau, self.hidden, self.steps, self.lr, self.weight_decay = tau, hidden, steps, lr, weight_decay
        self.head: torch.nn.Module | None = None
        self.mean = self.std = None
        self.fit_loss = float("nan")

    def fit(self, features: Tensor, targets: Tensor, seed: int = 0) -> ExpectileValue:
        """Fit on ``features`` [N, H] (one row per completion: its prompt's features) and ``targets`` [N]."""
        features, targets = features.double(), targets.double()
        self.mean, self.std = features.mean(dim=0), features.std(dim=0, correction=0).clamp_min(1e-6)
        x = (features - self.mean) / self.std
        generator = torch.Generator().manual_seed(seed)
        width = x.shape[1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=generator)))
            if self.hidden:
                head = torch.nn.Sequential(
                    torch.nn.Linear(width, self.hidden), torch.nn.Tanh(), torch.nn.Linear(self.hidden, 1)
                )
            else:
                head = torch.nn.Linear(width, 1)
        head = head.double()
        last = head[-1] if isinstance(head, torch.nn.Sequential) else head
        with torch.no_grad():  # start from the constant τ-expectile of the targets: the head learns what x adds
            last.weight.zero_()
            last.bias.fill_(float(expectile(targets, self.tau)))
        optimizer = torch.optim.Adam(head.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        for _ in range(self.steps):
            optimizer.zero_grad()
            loss = expectile_loss(head(x).squeeze(-1), targets, self.tau)
            loss.backward()
            optimizer.step()
        self.head = head.eval()
        with torch.no_grad():
            self.fit_loss = float(expectile_loss(self(features), targets, self.tau))
        return self

    @torch.no_grad()
    def __call__(self, features: Tensor) -> Tensor:
        """[N, H] -> [N] values (float64)."""
        if self.head is None:
            raise RuntimeError("ExpectileValue is not fit")
        return self.head((features.double() - self.mean) / self.std).squeeze(-1)
