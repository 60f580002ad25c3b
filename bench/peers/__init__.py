"""Other inference engines timed next to smelt's recipes (`smelt bench --peers`), one module per engine.

Each module exports `NAME`, `FORMATS`, `missing()` (why it cannot run here, with the install command,
or None) and `recipes(model_dir, setup, workdir)`: the engine's own conversion of the same fp32
weights into each format, as bench recipes that decode the same rendered prompts greedily.
"""
from __future__ import annotations

from pathlib import Path

from bench.peers import ct2

PEERS = {ct2.NAME: ct2}


def peer_recipes(model_dir: Path, setup, workdir: Path, echo=print) -> list:
    """Every installed peer's recipes on `model_dir`'s weights; a peer that is not installed is
    skipped with a line that says how to install it."""
    out = []
    for name, peer in PEERS.items():
        if reason := peer.missing():
            echo(f"  peer {name} skipped: {reason}")
            continue
        echo(f"  peer {name}: converting to {', '.join(peer.FORMATS)} ...")
        out += peer.recipes(model_dir, setup, workdir / name)
    return out
