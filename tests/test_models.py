import torch

from captioner.models import ShowTellDecoder, build_decoder


def _batch():
    captions = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 9, 2, 0], [1, 4, 2, 0, 0]])  # (B, T)
    lengths = torch.tensor([5, 4, 3])
    return captions, lengths


def test_teacher_forced_loss_equals_stepwise_loss():
    """forward() (packed, whole caption) and step() (one word at a time) are the same model."""
    torch.manual_seed(0)
    m = ShowTellDecoder(vocab_size=12, feature_dim=10, embed_size=6, hidden_size=8, num_layers=2).eval()
    feats = torch.randn(3, 10)
    captions, lengths = _batch()
    terms = m(feats, captions, lengths)
    state = m.init_state(feats)
    nll, count = 0.0, 0
    for t in range(captions.size(1) - 1):
        logp, state = m.step(captions[:, t], state)  # (B, V)
        for b in range(3):
            if t + 1 < lengths[b]:
                nll -= logp[b, captions[b, t + 1]].item()
                count += 1
    assert terms.tokens == count and abs(terms.nll_sum.item() - nll) < 1e-4
    assert abs(terms.mean().item() - nll / count) < 1e-5


def test_padding_costs_nothing():
    torch.manual_seed(0)
    m = ShowTellDecoder(vocab_size=12, feature_dim=10, hidden_size=8).eval()
    feats = torch.randn(3, 10)
    captions, lengths = _batch()
    padded = torch.cat([captions, torch.zeros(3, 4, dtype=torch.long)], dim=1)  # (B, T+4)
    assert torch.allclose(m(feats, captions, lengths).mean(), m(feats, padded, lengths).mean())


def test_gradients_flow_through_the_whole_caption():
    torch.manual_seed(0)
    m = ShowTellDecoder(vocab_size=12, feature_dim=10, hidden_size=8, dropout=0.0)
    feats = torch.randn(3, 10)
    captions, lengths = _batch()
    m(feats, captions, lengths).mean().backward()
    assert m.init_h.weight.grad.abs().sum() > 0  # the image reaches the last word's loss via BPTT
    assert m.embed.weight.grad[0].abs().sum() == 0  # <pad> embedding untouched


def test_build_decoder_by_name():
    m = build_decoder("lstm", vocab_size=20, feature_dim=7, hidden_size=9, num_layers=2)
    assert isinstance(m, ShowTellDecoder) and m.feature_kind == "pooled"
    s = m.init_state(torch.randn(4, 7))
    assert s.h.shape == (4, 2, 9) and s.index(torch.tensor([3, 3])).h.shape == (2, 2, 9)
    assert s.repeat_interleave(3).c.shape == (12, 2, 9)
