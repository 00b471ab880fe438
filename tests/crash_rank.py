"""Test helper: liandan's CLI with rank 1 crashing on its third forward pass (run under torchrun)."""

import os
import sys

import liandan.train
from liandan.cli import main

calls = {"n": 0}
real_forward = liandan.train.LossModule.forward


def crashing_forward(self, *args):
    calls["n"] += 1
    if os.environ.get("RANK") == "1" and calls["n"] == 3:
        raise RuntimeError("injected crash on rank 1")
    return real_forward(self, *args)


liandan.train.LossModule.forward = crashing_forward
main(sys.argv[1:])
