"""The transformer on the generated character text, through the Python API and the CLI."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from gfalign.cli import main
from gfalign.config import RunConfig
from gfalign.data import chars
from gfalign.data.text import ALPHABET, decode, text
from gfalign.rules import ConfigError


def test_the_text_is_the_same_for_the_same_seed_and_its_labels_are_the_next_character():
    a, b = chars(300, 50), chars(300, 50)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    source = text(300 + 33)
    for k in (0, 17, 299):
        assert decode(a.train.x[k]) == source[k : k + 32]
        assert ALPHABET[int(a.train.y[k])] == source[k + 32]
    assert decode(a.test.x[0]) != decode(a.train.x[0])  # the test text is another draw
    assert set(text(2000)) <= set(ALPHABET)
    held = chars(300, 50, validation=100)
    assert len(held.train) == 200 and torch.equal(held.validation.x, a.train.x[200:])


def test_the_transformer_refuses_the_autoencoder_and_images():
    with pytest.raises(ConfigError, match="not in \\[0, 1\\]"):
        RunConfig(dataset="chars", objective="autoencoder")
    with pytest.raises(ConfigError, match="model 'transformer'"):
        RunConfig(dataset="mnist", model="transformer")


@pytest.mark.parametrize("rule", ["bp", "fa", "dfa", "s1"])
def test_the_cli_trains_the_transformer_with_the_rule(tmp_path, rule):
    result = CliRunner().invoke(
        main,
        [
            "train", "--model", "transformer", "--dataset", "chars", "--rule", rule,
            "--epochs", "1", "--train-subset", "128", "--test-subset", "64", "-q",
            "--out", str(tmp_path / rule),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    config = RunConfig.from_toml(tmp_path / rule / "config.toml")
    assert (config.train.optimizer, config.train.batch_size) == ("adam", 64)  # its protocol
