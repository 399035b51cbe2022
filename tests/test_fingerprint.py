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
trained on, taken before sets named the model: it is the reference.

On a machine the file has no set for (or for a case its set lacks), the run is checked against
the same run in float64 instead, started from the same float32 weights and feedback: their
losses after the first epoch must agree to ``FLOAT64``. Only the first epoch is compared: these
runs take large steps (a summed loss at lr 0.01), and the second epoch carries float32's
rounding to 1% of the test loss (more than some cases differ by), so a tolerance there could not
tell one rule from another. A run whose float64 twin diverges (``s1 relu``'s test loss rises
from 2.9 to 546 in its first epoch) is not held up as right: it is only checked bit for bit on
the machines the file lists, and ``s1 relu stable`` covers relu at a rate that learns. brSF
redraws its feedback every step in the run's dtype, so a float64 twin draws other numbers: it
too is checked bit for bit only. After an intended change of the numbers, regenerate on each
processor with ``GFALIGN_WRITE_FINGERPRINTS=1 pytest tests/test_fingerprint.py``; without a
change, that adds this machine's set beside the others.
"""

from __future__ import annotations

import hashlib
import json
import math
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
        "s1 relu stable": _case("s1", activation="relu", lr=0.001),
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


FLOAT64 = 2e-4
"""Relative tolerance of the first epoch's losses against the float64 twin (float32 and float64
agree to 3e-5 or better on every case)."""
DTYPE_DRAWN = {"brsf"}
"""Rules that draw feedback during training in the run's dtype: no float64 twin exists."""


@pytest.fixture(scope="module")
def stored():
    """This machine's set of hashes (None when the file has none)."""
    machines = json.loads(FILE.read_text())["machines"] if FILE.is_file() else []
    mine = _own(machines)
    if WRITE:
        fresh = {"machine": _machine(), "runs": {}}
        yield {"own": None, "written": fresh}
        machines = [fresh if m is mine else m for m in machines]
        if mine is None:
            machines.append(fresh)
        FILE.write_text(json.dumps({"machines": machines}, indent=1, sort_keys=True) + "\n")
        return
    yield {"own": mine, "written": None}


def _float64_twin(case: dict, dataset: data.Dataset) -> tuple[list[dict], float]:
    """The case trained in float64 from the float32 run's initial weights and feedback, and
    its untrained test loss."""
    net, rule, config = _parts(case)
    net.double()
    rule.double()
    double = data.Dataset(
        dataset.name,
        data.Split(dataset.train.x.double(), dataset.train.y),
        data.Split(dataset.test.x.double(), dataset.test.y),
    )
    untrained, _error = gf.evaluate(net, double.test)
    return Trainer(net, rule, double, config).fit(), untrained


def _check(stored: dict, name: str, digest: str, history: list[dict], case: dict, dataset) -> None:
    if WRITE:
        stored["written"]["runs"][name] = {"digest": digest, "test_loss": history[-1]["test_loss"]}
        return
    own = (stored["own"] or {}).get("runs", {})
    if name in own:
        assert digest == own[name]["digest"], f"{name}: the numbers moved"
        return
    if case["rule"] in DTYPE_DRAWN:
        pytest.skip(f"{name}: draws its feedback in the run's dtype; checked bit for bit only")
    twin, untrained = _float64_twin(case, dataset)
    losses = [record["test_loss"] for record in twin]
    if not all(math.isfinite(v) and v < 2 * untrained for v in losses):
        pytest.skip(f"{name} diverges in float64 (test losses {losses}, {untrained:.3g} untrained)")
    for key in ("train_loss", "test_loss"):
        expected = twin[0][key]
        assert history[0][key] == pytest.approx(expected, rel=FLOAT64), f"{name}: {key}"


@pytest.mark.parametrize("name", list(CASES))
def test_a_run_keeps_its_numbers(name, dataset, stored):
    net, rule, config = _parts(CASES[name])
    history = Trainer(net, rule, dataset, config).fit()
    _check(stored, name, _digest(net, history), history, CASES[name], dataset)


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
            history,
            _case("s1", seed=seed),
            dataset,
        )
