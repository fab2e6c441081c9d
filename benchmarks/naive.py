"""The baseline: post-hoc CMD written the straightforward way, as research code does it.

All checkpoints are loaded and stacked into one ``N × T`` float64 matrix in RAM; the correlations
with the references, the assignment and the least-squares fit loop over modes, each pass over the
whole matrix. Same steps and the same parameter sample as ``cmd fit`` (so the labels can be
compared), none of its streaming. Not part of cmdtool; used by ``run.py`` to time the baseline.

    python naive.py CKPT_DIR OUT.npz [-m M] [-k K] [--seed S]
"""

from __future__ import annotations

import argparse
import glob
import os
import re

import numpy as np
import torch
from safetensors.torch import load_file
from scipy.cluster.hierarchy import fcluster, linkage

from cmdtool.decompose import sample_parameters


def load_trajectory(folder: str) -> tuple[np.ndarray, list[int]]:
    """``W`` (N × T, float64) of every floating-point tensor, and the tensor sizes."""
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")),
                   key=lambda p: int(re.findall(r"\d+", os.path.basename(p))[-1]))
    columns, sizes = [], None
    for path in files:
        state = load_file(path)
        floats = [t for t in state.values() if t.is_floating_point()]
        sizes = [t.numel() for t in floats]
        columns.append(torch.cat([t.reshape(-1).double() for t in floats]).numpy())
    return np.stack(columns, axis=1), sizes


def cmd(W: np.ndarray, sizes: list[int], M: int, K: int, seed: int):
    N, T = W.shape
    varies = (W != W[:, :1]).any(axis=1)
    sample = sample_parameters(sizes, varies, K, seed)
    C = np.nan_to_num(np.abs(np.corrcoef(W[sample])))
    raw = fcluster(linkage(C, method="complete", metric="euclidean"), t=M, criterion="maxclust")
    ids, counts = np.unique(raw, return_counts=True)
    clusters = [np.flatnonzero(raw == i) for i in ids[np.argsort(-counts, kind="stable")]]
    references = []
    for members in clusters:
        block = C[np.ix_(members, members)]
        mean_corr = (block.sum(axis=1) - 1.0) / max(len(members) - 1, 1)
        references.append(sample[members[np.argmax(mean_corr)]])
    R = W[references]                                             # (M, T) raw references

    centred = W - W.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1)
    best = np.full(N, -1.0)
    labels = np.zeros(N, dtype=np.int64)
    for m, r in enumerate(R):                                     # step 5: one pass per mode
        rc = r - r.mean()
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = np.abs(centred @ rc) / (norms * np.linalg.norm(rc))
        corr = np.nan_to_num(corr)
        better = corr > best
        labels[better], best[better] = m, corr[better]
    a, b = np.zeros(N), np.zeros(N)
    for m, r in enumerate(R):                                     # step 6: least squares per mode
        members = np.flatnonzero(labels == m)
        A = np.stack([r, np.ones(T)], axis=1)
        coef, *_ = np.linalg.lstsq(A, W[members].T, rcond=None)
        a[members], b[members] = coef
    return labels, a, b, R


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder")
    parser.add_argument("output")
    parser.add_argument("-m", "--modes", type=int, default=10)
    parser.add_argument("-k", "--samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    W, sizes = load_trajectory(args.folder)
    labels, a, b, R = cmd(W, sizes, args.modes, args.samples, args.seed)
    np.savez(args.output, labels=labels.astype(np.uint8), a=a.astype(np.float32), b=b.astype(np.float32),
             references=R.astype(np.float32))
