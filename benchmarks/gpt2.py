"""A synthetic bfloat16 training run with GPT-2 small's state-dict layout (124 M floats), as safetensors files.

The layout is Hugging Face's ``GPT2LMHeadModel`` (``gpt2``) without the tied ``lm_head``: token and
position embeddings, 12 blocks of layer norms, attention and MLP (``Conv1D`` weights), the final
layer norm; 124,439,808 floats. ``scale`` < 1 shrinks the vocabulary, the positions and the number
of blocks by that factor (N about ``scale`` × 124 M: 0.09 gives 10.7 M, 0.36 gives 42.5 M) for a
quick run and for the memory-growth check at several sizes; below one block (``scale`` < 1/12) the
width shrinks too. The dynamics are ``generate.py``'s (shared random-walk profiles, an affine
map per parameter, noise), each checkpoint rounded to bfloat16 as a bf16 training run saves it.
Generated checkpoint by checkpoint, seeded, and cached: a folder is reused when its ``DONE`` marker
matches.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

VERSION = 2
PROFILES = 5
D_MODEL, VOCAB, POSITIONS, BLOCKS = 768, 50257, 1024, 12


def gpt2_layout(scale: float = 1.0) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every tensor, in the state dict's order (all bfloat16)."""
    vocab, positions = max(1, round(VOCAB * scale)), max(1, round(POSITIONS * scale))
    blocks = max(1, round(BLOCKS * scale))
    d = D_MODEL if BLOCKS * scale >= 1 else max(12, 12 * round(D_MODEL * math.sqrt(BLOCKS * scale) / 12))
    layout = [("transformer.wte.weight", (vocab, d)), ("transformer.wpe.weight", (positions, d))]
    for i in range(blocks):
        p = f"transformer.h.{i}"
        layout += [(f"{p}.ln_1.weight", (d,)), (f"{p}.ln_1.bias", (d,)),
                   (f"{p}.attn.c_attn.weight", (d, 3 * d)), (f"{p}.attn.c_attn.bias", (3 * d,)),
                   (f"{p}.attn.c_proj.weight", (d, d)), (f"{p}.attn.c_proj.bias", (d,)),
                   (f"{p}.ln_2.weight", (d,)), (f"{p}.ln_2.bias", (d,)),
                   (f"{p}.mlp.c_fc.weight", (d, 4 * d)), (f"{p}.mlp.c_fc.bias", (4 * d,)),
                   (f"{p}.mlp.c_proj.weight", (4 * d, d)), (f"{p}.mlp.c_proj.bias", (d,))]
    return layout + [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]


def n_floats(layout) -> int:
    return sum(math.prod(shape) for _, shape in layout)


def generate_gpt2(folder: Path, scale: float = 1.0, T: int = 20, seed: int = 0) -> Path:
    """Write ``step_0.safetensors … step_{T-1}.safetensors`` (bfloat16) into ``folder`` unless cached."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    marker = folder / "DONE"
    key = json.dumps({"version": VERSION, "scale": scale, "T": T, "seed": seed})
    if marker.exists() and marker.read_text() == key:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    for old in folder.glob("*.safetensors"):
        old.unlink()
    rng = np.random.default_rng(seed)
    layout = gpt2_layout(scale)
    N = n_floats(layout)
    steps = rng.standard_normal((PROFILES, T)) * (0.3 + np.exp(-np.arange(T) / 6.0))
    profiles = np.cumsum(steps, axis=1)
    profiles -= profiles[:, :1]
    start = np.empty(N, dtype=np.float32)
    slope = np.empty(N, dtype=np.float32)
    offset = 0
    for name, shape in layout:
        size = math.prod(shape)
        norm = ".ln_" in name
        start[offset:offset + size] = (1.0 if norm and name.endswith("weight") else 0.0) + (
            0.0 if norm else 0.02 * rng.standard_normal(size, dtype=np.float32))
        slope[offset:offset + size] = 0.004 * rng.standard_normal(size, dtype=np.float32)
        offset += size
    which = rng.integers(0, PROFILES, size=N).astype(np.uint8)
    for t in range(T):
        values = start + slope * profiles[which, t].astype(np.float32)
        if t:
            values += 1e-4 * rng.standard_normal(N, dtype=np.float32)
        flat = torch.from_numpy(values).to(torch.bfloat16)
        del values
        tensors, offset = {}, 0
        for name, shape in layout:
            size = math.prod(shape)
            tensors[name] = flat[offset:offset + size].reshape(shape).clone()  # save_file refuses shared memory
            offset += size
        save_file(tensors, str(folder / f"step_{t}.safetensors"), metadata={"step": str(t)})
        del flat, tensors
    marker.write_text(key)
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("-T", type=int, default=20)
    args = parser.parse_args()
    print(generate_gpt2(args.folder, args.scale, args.T))
