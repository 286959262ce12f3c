"""A fast, deterministic victim for the distributed / shard / validation tests: a seeded linear binary classifier on
the phantom's 1×64×64 images (same weights in every process and run, no training), and a tiny grid around it."""
import sqlite3
from contextlib import contextmanager

import torch

LINEAR = "linear.phantom"


class _Linear(torch.nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(1, 64 * 64, generator=g) * 0.05)
        self.b = torch.nn.Parameter(torch.zeros(1))

    def forward(self, z):
        return z.flatten(1) @ self.w.t() + self.b


def make_linear(**_kw):
    from robustbench_med.victim import ModelVictim, VictimCard

    card = VictimCard(name=LINEAR, task="binary", modality="CT", input_size=(1, 64, 64), classes=("absent", "present"))
    return ModelVictim(_Linear(), card).eval()


@contextmanager
def linear_victim():
    from robustbench_med.registry import VICTIMS

    VICTIMS.add(LINEAR, make_linear, task="binary", card=make_linear().card)
    try:
        yield LINEAR
    finally:
        VICTIMS.remove(LINEAR)


def tiny_grid(**overrides):
    """Three victim × defence pairs, an eps cascade and a single-eps attack, 8 samples in units of 4."""
    grid = {
        "name": "tiny", "n_examples": 8, "batch_size": 4,
        "victims": [{"name": LINEAR, "weights": None, "target_field": "label"}],
        "attacks": [{"name": "pgd.linf", "params": {"eps": ["2/255", "8/255"], "steps": 2}},
                    {"name": "fgsm.linf", "params": {"eps": "4/255"}}],
        "defenses": ["identity.none", {"name": "jpeg.bpda", "params": {"quality": 60}}, "squeeze.bitdepth"],
    }
    grid.update(overrides)
    return grid


def table(db, sql):
    """The rows of ``sql`` on the store file ``db``."""
    con = sqlite3.connect(db)
    rows = con.execute(sql).fetchall()
    con.close()
    return rows


def store_contents(db):
    """Everything a run computed (not timings or run records), in a fixed order: two stores with equal contents hold
    the same results."""
    return {
        "samples": table(db, "SELECT * FROM samples ORDER BY cell_id, sample_idx"),
        "clean": table(db, "SELECT * FROM clean ORDER BY group_key, sample_idx"),
        "cells": table(db, "SELECT cell_id, victim, defense, attack, attack_params, status, weights_sha256 FROM cells ORDER BY cell_id"),
        "units": table(db, "SELECT * FROM units ORDER BY cell_id, start"),
        "flags": table(db, "SELECT * FROM flags ORDER BY group_key, flag"),
    }
