"""Fingerprints of short MLP runs: the numbers a change to the engine must not move.

Each case trains a small MLP for two epochs on the synthetic set and hashes the final weights
and biases (their bytes) with every per-epoch number but the timing. The hashes in
``fingerprints.json`` were taken from the engine that produced the committed results in
``results/``, so a test that passes here says those results stay valid, bit for bit.

Bit-identity holds for one build of PyTorch on one kind of processor at one number of threads
(its matrix kernels fix the order of every sum; the hashes are taken with two threads, which
the tests set whatever ``OMP_NUM_THREADS`` says). The file holds one set of hashes per build,
vector extension and processor model (``machines``; two AVX512 processors of other models
were seen to differ in the last bits). The first set is the one the committed results were
trained on, taken before sets named the model: it is the reference. On a machine the file has
no set for, the test compares the final test losses with the reference's to 2% instead:
another processor's kernels round differently, and two epochs carry that to up to 0.5% of the
test loss (AVX2 against AVX512). After an intended change of the numbers,
regenerate on each processor with ``GFALIGN_WRITE_FINGERPRINTS=1 pytest
tests/test_fingerprint.py``; without a change, that adds this machine's set beside the others.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch

import gfalign as gf
from gfalign import data
from gfalign.ensemble import EnsembleTrainer
from gfalign.rules import PRESETS
from gfalign.train import TrainConfig, Trainer

FILE = Path(__file__).with_name("fingerprints.json")
WRITE = os.environ.get("GFALIGN_WRITE_FINGERPRINTS") == "1"
HIDDEN = (24, 20, 16)


def _machine() -> dict[str, str]:
    """The PyTorch build, its vector extension and the processor's model: two processors with
    the same extension may still take other kernels (one AVX512 machine's hashes fail on
    another's)."""
    machine = {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                machine["model"] = line.split(":", 1)[1].strip()
                break
    return machine


def _own(machines: list[dict]) -> dict | None:
    """The set recorded on this very machine (build, extension and model), if any: any other
    is only compared to the reference's test losses."""
    return next((m for m in machines if m["machine"] == _machine()), None)


def _case(
    rule: str,
    *,
    activation: str = "tanh",
    objective: str = "classification",
    feedback: str = "uniform",
    optimizer: str = "sgd",
    options: dict | None = None,
    lr: float = 0.01,
    seed: int = 0,
) -> dict:
    return {
        "rule": rule,
        "activation": activation,
        "objective": objective,
        "feedback": feedback,
        "optimizer": optimizer,
        "options": options or {},
        "lr": lr,
        "seed": seed,
    }


CASES: dict[str, dict] = {f"{name} tanh": _case(name) for name in PRESETS}
CASES.update(
    {
        "s1 relu": _case("s1", activation="relu"),
        "s2-aux sigmoid": _case("s2-aux", activation="sigmoid", lr=0.05),
        "bp autoencoder": _case("bp", activation="sigmoid", objective="autoencoder", lr=0.05),
        "s3 autoencoder": _case("s3", activation="sigmoid", objective="autoencoder", lr=0.05),
        "s1 momentum": _case("s1", options={"momentum": 0.9}, lr=0.001),
        "dfa adam": _case("dfa", optimizer="adam", lr=0.001),
        "s1 seed 3": _case("s1", seed=3),
    }
)
CASES.update(
    {
        f"{rule} {family}": _case(rule, feedback=family)
        for rule in ("fa", "dfa")
        for family in ("B1", "B2", "B3", "B4", "B5", "B6", "B7")
    }
)


def _parts(case: dict) -> tuple[gf.MLP, gf.FeedbackRule, TrainConfig]:
    output = 784 if case["objective"] == "autoencoder" else 10
    sizes = (784, *HIDDEN, output)
    net = gf.MLP(sizes, case["activation"], case["objective"], seed=case["seed"])
    rule = gf.FeedbackRule(
        gf.rules.resolve(
            case["rule"], len(HIDDEN), gf.feedback.FeedbackSpec.parse(case["feedback"])
        ),
        sizes,
        seed=case["seed"],
    )
    config = TrainConfig(
        epochs=2,
        batch_size=32,
        lr=case["lr"],
        optimizer=case["optimizer"],
        optimizer_options=case["options"],
        seed=case["seed"],
    )
    return net, rule, config


def _digest(net: torch.nn.Module, history: list[dict]) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for record in history:
        for key in sorted(record):
            if key != "seconds" and isinstance(record[key], (int, float)):
                digest.update(key.encode() + struct.pack("<d", float(record[key])))
    return digest.hexdigest()


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dataset():
    return data.synthetic(256, 64, seed=0)


CROSS_MACHINE = 2e-2
"""Relative tolerance of the final test loss on a processor without its own hashes."""


@pytest.fixture(scope="module")
def stored():
    """This machine's set of hashes (None when the file has none) and the reference set."""
    machines = json.loads(FILE.read_text())["machines"] if FILE.is_file() else []
    mine = _own(machines)
    if WRITE:
        fresh = {"machine": _machine(), "runs": {}}
        yield {"own": None, "reference": None, "written": fresh}
        machines = [fresh if m is mine else m for m in machines]
        if mine is None:
            machines.append(fresh)
        FILE.write_text(json.dumps({"machines": machines}, indent=1, sort_keys=True) + "\n")
        return
    yield {"own": mine, "reference": machines[0], "written": None}


def _check(stored: dict, name: str, digest: str, test_loss: float) -> None:
    if WRITE:
        stored["written"]["runs"][name] = {"digest": digest, "test_loss": test_loss}
        return
    if stored["own"] is not None:
        assert digest == stored["own"]["runs"][name]["digest"], f"{name}: the numbers moved"
    else:
        expected = stored["reference"]["runs"][name]["test_loss"]
        assert test_loss == pytest.approx(expected, rel=CROSS_MACHINE), name


@pytest.mark.parametrize("name", list(CASES))
def test_a_run_keeps_its_numbers(name, dataset, stored):
    net, rule, config = _parts(CASES[name])
    history = Trainer(net, rule, dataset, config).fit()
    _check(stored, name, _digest(net, history), history[-1]["test_loss"])


def test_stacked_members_keep_their_numbers(dataset, stored):
    trainers = []
    for seed in (0, 1, 2):
        net, rule, config = _parts(_case("s1", seed=seed))
        trainers.append(Trainer(net, rule, dataset, config))
    histories = EnsembleTrainer.from_trainers(trainers).fit()
    for seed, trainer, history in zip((0, 1, 2), trainers, histories, strict=True):
        _check(
            stored,
            f"stacked s1 seed {seed}",
            _digest(trainer.net, history),
            history[-1]["test_loss"],
        )
