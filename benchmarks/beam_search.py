"""Batched beam search vs the classic per-image beam loop, same decoder weights and features.

    python benchmarks/beam_search.py [--model RUN/best.pt] [--images 100] [--beam 5] [--json OUT]

The baseline is written the way the classic PyTorch captioning tutorials do it: one image at a
time, its k beams as the batch, completed beams moved out of the batch in Python. Ours advances
all images x beams as one tensor program (captioner.decoding.beam_search). With --model (any
checkpoint captioner writes: Show-and-Tell, attention, a sequence model, the bundled one) the
decoder is a trained one and the inputs are Flickr8k val images' features (when present; one
frame each for a sequence model) in the form that decoder takes; otherwise random weights and
features, where captions run to --max-len (the worst case).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import FLICKR8K, Timer, machine, random_decoder

from captioner.decoding import END_ID, START_ID, beam_search


@torch.no_grad()
def tutorial_beam_search(decoder, frames: list[torch.Tensor], k: int, max_len: int) -> list[list[int]]:
    """Per-image beam search in the style of the classic tutorials (beams = the batch of one image).
    frames: per item, its frames' features (F, ...)."""
    out = []
    for item in frames:  # one image at a time
        beam = k
        state = decoder.init_state(decoder.from_frames([item])).repeat_interleave(beam)
        prev_words = torch.full((beam,), START_ID, dtype=torch.long)
        seqs = prev_words[:, None]  # (k, 1)
        top_scores = torch.zeros(beam, 1)
        complete, complete_scores = [], []
        step = 1
        while True:
            logp, state = decoder.step(prev_words, state)  # (k, V)
            V = logp.size(1)
            scores = top_scores.expand_as(logp) + logp
            if step == 1:
                top_scores, top_words = scores[0].topk(beam)
            else:
                top_scores, top_words = scores.view(-1).topk(beam)
            prev_inds, next_words = top_words // V, top_words % V
            seqs = torch.cat([seqs[prev_inds], next_words[:, None]], dim=1)
            incomplete = [i for i, w in enumerate(next_words) if w != END_ID]
            done = [i for i in range(len(next_words)) if i not in incomplete]
            if done:
                complete.extend(seqs[done].tolist())
                complete_scores.extend(top_scores[done].tolist())
            beam -= len(done)
            if beam == 0 or step >= max_len:
                break
            seqs = seqs[incomplete]
            state = state.index(prev_inds[incomplete])
            top_scores = top_scores[incomplete][:, None]
            prev_words = next_words[incomplete]
            step += 1
        if not complete:  # no beam ended: take the best unfinished one
            complete, complete_scores = seqs.tolist(), top_scores.view(-1).tolist()
        best = complete[max(range(len(complete)), key=complete_scores.__getitem__)]
        out.append([w for w in best[1:] if w != END_ID])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a captioner checkpoint (default: random weights)")
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--max-len", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, metavar="OUT", help="write the numbers here too")
    a = ap.parse_args()

    if a.model:
        from captioner import Captioner
        from captioner.data import load_coco
        from captioner.features import FeatureCache

        model = Captioner.load(a.model, device="cpu")
        decoder = model.decoder
        kind = decoder.feature_kind  # what the decoder (or a sequence model's frames) takes: pooled or grid
        if (FLICKR8K / "captions_val.json").is_file():
            paths = load_coco(FLICKR8K / "captions_val.json", FLICKR8K / "images").paths[: a.images]
            cache = FeatureCache(model.encoder)
            cache.fill(paths)
            store = cache.load(paths, kind)
            features, source = store[list(range(len(paths)))].float(), "Flickr8k val features"
        else:
            regions = (49,) if kind == "grid" else ()  # 7x7 regions at 224 px
            features = torch.randn(a.images, *regions, model.encoder.feature_dim)
            source = "random features"
    else:
        decoder, _ = random_decoder()
        features, source = torch.randn(a.images, 1280), "random features"
    decoder.eval()
    frames = list(features[:, None])  # per item: one frame (1, ...)

    tutorial_s, ours_s = [], []
    for _ in range(a.repeats):  # interleaved, so both see the same machine state
        with Timer() as t:
            theirs = tutorial_beam_search(decoder, frames, a.beam, a.max_len)
        tutorial_s.append(t.s)
        with Timer() as t:
            hyps = beam_search(decoder, decoder.from_frames(frames), beam_size=a.beam, max_len=a.max_len)
        ours_s.append(t.s)
    same = sum(h[0].tokens == s for h, s in zip(hyps, theirs))
    agree = same / len(theirs)
    tb, ob = min(tutorial_s), min(ours_s)
    print(f"machine: {machine()}")
    print(
        f"decoder: {'trained ' + a.model if a.model else 'random weights'}; {source}; "
        f"{a.images} images, beam {a.beam}, max_len {a.max_len}; best of {a.repeats}"
    )
    print(f"| beam search, {a.images} images | seconds | images/s |")
    print("|---|---|---|")
    print(f"| per-image loop (classic tutorials) | {tb:.2f} | {a.images / tb:.1f} |")
    print(f"| batched (captioner) | {ob:.2f} | {a.images / ob:.1f} |")
    print(f"| **speed-up** | **{tb / ob:.1f}x** | |")
    print(f"same best caption on {agree:.0%} of images (the loop shrinks its beam as beams end; ours keeps k live)")
    if a.json:
        out = {
            "machine": machine(),
            "decoder": a.model or "random weights",
            "source": source,
            "images": a.images,
            "beam": a.beam,
            "max_len": a.max_len,
            "repeats": a.repeats,
            "captions": {"per-image loop": len(theirs), "batched": len(hyps)},
            "seconds": {"per-image loop": tutorial_s, "batched": ours_s},
            "best_s": {"per-image loop": tb, "batched": ob},
            "images_per_s": {"per-image loop": a.images / tb, "batched": a.images / ob},
            "speed_up": tb / ob,
            "same_best_caption": same,
            "same_best_caption_share": agree,
        }
        a.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
