"""How far can a token steer the frozen network? The phantom model of benchmarks/learned_site.py (trained on
sites A/B/C) harmonizes the same 9 held-out scans to the new site D with tokens that need no learning (each
training site's own, and points on the line from A's to C's: D's contrast exponent 1.3 lies between A's 1.0
and C's 1.6), and with D's token learned from 4 scans of D with the diffusion loss over all timesteps or
only the noisier ones (t >= 500, t >= 800 of 1000), where the site decides most of what is drawn.

    python benchmarks/learned_site_reach.py [--workdir /tmp/harmodiff_learned_site --reuse] > benchmarks/learned_site_reach.md

If the learned token scores like the best token on the line, the learning finds what the frozen network can
draw for D, and the gap to the model trained with D (benchmarks/learned_site.md) is the network's.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import learned_site as ls  # noqa: E402
from harmodiff import sites  # noqa: E402
from harmodiff.harmonize import harmonize_array  # noqa: E402
from harmodiff.tables import markdown_table  # noqa: E402
from harmodiff.train import make_batch  # noqa: E402

LEARN_SCANS = 4
LEARN = sites.LearnSiteConfig(steps=200, lr=0.05, batch_size=4, seed=0)


def learn_from_noisier(model, record, volumes, t_min: int) -> torch.Tensor:
    """`sites.learn_site` with each sample's timestep drawn from [t_min, T) instead of [0, T)."""
    T = record.num_train_timesteps

    def batches(spec, step):
        batch = list(make_batch(spec, step, range(LEARN.batch_size)))
        batch[4] = t_min + batch[4] % (T - t_min)
        return tuple(batch)

    return sites.learn_site(model, record, volumes, "D", LEARN, batches=batches)[0]


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="/tmp/harmodiff_learned_site")
    p.add_argument("--reuse", action="store_true", help="reuse the A/B/C model already trained in --workdir")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, record = ls.train_model(Path(a.workdir), False, ls.TRAIN.steps, a.reuse)
    cases = ls.held_out()
    labels = record.labels
    weight = model.site_embedding.weight.detach()
    token = {s: torch.stack([weight[labels.index(s, g)] for g in labels.levels]) for s in labels.trained}

    def scored(name, embeddings):
        site = sites.LearnedSite("D", embeddings, tuple(labels.levels), "0" * 64, (), LEARN.steps, ())
        m, r = sites.with_learned_site(copy.deepcopy(model), record, site)
        row = ls.score([harmonize_array(m, r, src, brain, "D", ls.SETTINGS)[0] for _, _, src, brain, _ in cases],
                       cases)
        print(name, row, file=sys.stderr, flush=True)
        return {"token for D": name, **row}

    rows = [scored(f"{s}'s own", token[s]) for s in labels.trained]
    rows += [scored(f"A + {f} (C - A)", token["A"] + f * (token["C"] - token["A"])) for f in (0.25, 0.5, 0.75)]
    volumes = [ls.scan(k, "D") for k in list(ls.D_SCANS)[:LEARN_SCANS]]
    rows.append(scored(f"learned from {LEARN_SCANS} scans, all timesteps (sites.learn_site)",
                       sites.learn_site(model, record, volumes, "D", LEARN)[0]))
    for t_min in (500, 800):
        rows.append(scored(f"learned from {LEARN_SCANS} scans, t >= {t_min} only",
                           learn_from_noisier(model, record, volumes, t_min)))
    table = pd.DataFrame(rows)
    print("# How far a token steers the frozen phantom network\n")
    print(f"Command: `python benchmarks/learned_site_reach.py`. The A/B/C model and the "
          f"9 held-out scans of `benchmarks/learned_site.py`, harmonized to D from noise (10 DDIM steps, CFG++ "
          f"0.6), scored inside the brain against the truth at D; learning {LEARN.steps} steps of batch "
          f"{LEARN.batch_size}, lr {LEARN.lr}. CPU, {a.threads} thread(s), one run.\n")
    print(markdown_table(table))


if __name__ == "__main__":
    main()
