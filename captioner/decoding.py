"""Decoding torch models: beam search (beam.py, written once in numpy) over a torch decoder
through `TorchSteps`; sampling with the graph kept (self-critical training); ensembles as one
more step model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import beam
from .beam import DEAD_END_LOGP, END_ID, PAD_ID, START_ID, Hypothesis, StepModel, constraints_met  # noqa: F401
from .models.base import CaptionModel, DecoderState


class TorchRows:
    """A torch DecoderState seen by beam.py: numpy row indices in, the attention out as numpy."""

    def __init__(self, state: DecoderState) -> None:
        self.state = state

    @property
    def batch_size(self) -> int:
        return self.state.batch_size

    @property
    def alpha(self) -> np.ndarray | None:
        a = getattr(self.state, "alpha", None)  # (N, R)
        return None if a is None else a.detach().float().cpu().numpy()

    def _idx(self, idx: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64)).to(self.state.device)

    def index(self, idx: np.ndarray) -> TorchRows:
        return TorchRows(self.state.index(self._idx(idx)))

    def put(self, idx: np.ndarray, rows: TorchRows) -> TorchRows:
        return TorchRows(self.state.put(self._idx(idx), rows.state))

    def repeat_interleave(self, k: int) -> TorchRows:
        return TorchRows(self.state.repeat_interleave(k))


class TorchSteps:
    """A torch CaptionModel as beam.py's step model: tokens and log-probabilities cross as numpy
    arrays (no copy on the CPU; one (N, V) copy per word from a GPU), the state stays on the device.
    Runs the decoder in eval mode, without autograd."""

    def __init__(self, model: CaptionModel) -> None:
        self.model = model

    @torch.no_grad()
    def init_state(self, features: Any) -> TorchRows:
        return TorchRows(self.model.init_state(features))

    @torch.no_grad()
    def step(self, tokens: np.ndarray, state: TorchRows) -> tuple[np.ndarray, TorchRows]:
        dev = state.state.device
        logp, nxt = self.model.step(torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).to(dev), state.state)
        return logp.float().cpu().numpy(), TorchRows(nxt)


def _numpy(x: Any) -> Any:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else x


def beam_search(model: CaptionModel | StepModel, features: Any, **settings: Any) -> list[list[Hypothesis]]:
    """beam.beam_search over a torch CaptionModel (see there for the settings); tensors given as
    `bias`, `prefix` or `banned_bigrams` may live on any device. The model is searched in eval
    mode (no dropout) and left in the mode it was in."""
    if isinstance(model, torch.nn.Module):
        was_training = model.training
        model.eval()
        try:
            return beam_search(TorchSteps(model), features, **settings)
        finally:
            model.train(was_training)
    for key in ("bias", "prefix"):
        if settings.get(key) is not None:
            settings[key] = _numpy(settings[key])
    if settings.get("banned_bigrams") is not None:
        settings["banned_bigrams"] = tuple(_numpy(x) for x in settings["banned_bigrams"])
    return beam.beam_search(model, features, **settings)


def sample(
    model: CaptionModel,
    features: Any,
    n: int = 1,
    max_len: int = 16,
    temperature: float = 1.0,
    suppress: Sequence[int] = (),
) -> tuple[Tensor, Tensor, Tensor]:
    """n captions per input drawn from the model, keeping the graph (for self-critical training).
    `suppress`: token ids never to draw (<unk>, as at inference: a sample should be a caption the
    model could print).

    Returns tokens (B*n, T) (the n samples of input b are rows b*n .. b*n+n-1; <pad> after <end>),
    the log-probability of each chosen token (B*n, T) and the mask of real steps, <end> included
    (B*n, T). A sample that holds no <end> was cut at max_len.
    """
    state = model.init_state(features).repeat_interleave(n)
    N, dev = state.batch_size, state.device
    tokens = torch.full((N,), START_ID, dtype=torch.long, device=dev)
    finished = torch.zeros(N, dtype=torch.bool, device=dev)
    banned = [PAD_ID, START_ID, *suppress]
    out_tokens, out_logp, out_mask = [], [], []
    for _ in range(max_len):
        logp, state = model.step(tokens, state)  # (N, V)
        logp = logp.float().clone()
        logp[:, banned] = float("-inf")
        with torch.no_grad():
            probs = (logp / temperature).softmax(dim=-1)  # (N, V): renormalised without the banned ids
            tokens = torch.multinomial(probs, 1).squeeze(1)  # (N,)
        chosen = logp.log_softmax(dim=-1).gather(1, tokens[:, None]).squeeze(1)  # (N,)
        out_mask.append(~finished)
        out_tokens.append(tokens.masked_fill(finished, PAD_ID))
        out_logp.append(chosen.masked_fill(finished, 0.0))
        finished = finished | (tokens == END_ID)
        tokens = tokens.masked_fill(finished, PAD_ID)
        if bool(finished.all()):
            break
    return torch.stack(out_tokens, 1), torch.stack(out_logp, 1), torch.stack(out_mask, 1)


@dataclass
class EnsembleState(DecoderState):
    """The members' states side by side; reordering beams reorders every member's rows alike."""

    states: tuple[DecoderState, ...] = ()

    @property
    def batch_size(self) -> int:
        return self.states[0].batch_size

    @property
    def device(self):
        return self.states[0].device

    @property
    def alpha(self) -> Tensor | None:
        """The members' mean attention (N, R) when all attend over the same regions, else None."""
        alphas = [getattr(s, "alpha", None) for s in self.states]
        if any(a is None for a in alphas) or len({a.shape for a in alphas}) != 1:
            return None
        return torch.stack(alphas).mean(0)

    def index(self, idx: Tensor) -> EnsembleState:
        return EnsembleState(tuple(s.index(idx) for s in self.states))

    def put(self, idx: Tensor, rows: EnsembleState) -> EnsembleState:
        return EnsembleState(tuple(s.put(idx, r) for s, r in zip(self.states, rows.states)))

    def repeat_interleave(self, k: int) -> EnsembleState:
        return EnsembleState(tuple(s.repeat_interleave(k) for s in self.states))


class EnsembleDecoder(CaptionModel):
    """Several decoders over one vocabulary as one model of the step interface, so beam search,
    sampling and everything above them work unchanged: its input is the tuple of the members'
    inputs, and each step's log-probabilities are the mean of the members' log-probabilities,
    renormalised (log_softmax), i.e. their normalised geometric mean."""

    def __init__(self, members: Sequence[CaptionModel]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        kinds = {m.attends_over for m in members}
        self.attends_over = kinds.pop() if len(kinds) == 1 else None

    def init_state(self, features: Sequence[Any]) -> EnsembleState:
        return EnsembleState(tuple(m.init_state(f) for m, f in zip(self.members, features)))

    def step(self, tokens: Tensor, state: EnsembleState) -> tuple[Tensor, EnsembleState]:
        outs = [m.step(tokens, s) for m, s in zip(self.members, state.states)]
        logp = torch.stack([o[0].float() for o in outs]).mean(0)  # (N, V)
        return logp.log_softmax(dim=-1), EnsembleState(tuple(o[1] for o in outs))
