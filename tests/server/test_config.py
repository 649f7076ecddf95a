"""Settings come from ZIMAGE_* variables or CLI flags, and bad ones are refused up front."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError
from pydantic_settings import CliApp

from zimage_server.cli import main
from zimage_server.core.config import Settings, parse_size, unknown_variables
from zimage_server.core.keys import parse_keys


def test_environment_variables_configure_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZIMAGE_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("ZIMAGE_WARMUP_SIZES", "512x512, 1024x768")
    monkeypatch.setenv("ZIMAGE_MODEL", "hf://Tongyi-MAI/Z-Image-Turbo@main")
    monkeypatch.setenv("ZIMAGE_HF_TOKEN", "hf_secret")
    settings = Settings(_env_file=None)
    assert settings.max_batch_size == 8
    assert settings.warmup_sizes == ["512x512", "1024x768"]
    assert settings.model == "hf://Tongyi-MAI/Z-Image-Turbo@main"
    assert "hf_secret" not in repr(settings), "the token must never be printed"


def test_cli_flags_configure_the_server() -> None:
    settings = CliApp.run(
        Settings,
        cli_args=[
            "--max-batch-size",
            "2",
            "--batch-wait-ms",
            "25",
            "--warmup-sizes",
            "256x256,512x512",
            "--port",
            "9001",
        ],
    )
    assert (settings.max_batch_size, settings.batch_wait_ms, settings.port) == (2, 25.0, 9001)
    assert settings.warmup_sizes == ["256x256", "512x512"]


def test_defaults_suit_turbo() -> None:
    settings = Settings(_env_file=None)
    assert settings.model == "builtin://tiny"
    assert settings.default_steps == 8
    assert settings.host == "127.0.0.1"


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"warmup_sizes": ["1000x1000"]}, "multiples of 16"),
        ({"min_size": 1024, "max_size": 512}, "must not exceed max_size"),
        ({"default_size": "4096x4096"}, "between 256 and 2048"),
        ({"max_batch_size": 0}, "greater than or equal to 1"),
        ({"dtype": "int8"}, "'auto', 'bfloat16', 'float16' or 'float32'"),
        ({"default_steps": 60}, "default_steps must not exceed max_steps"),
    ],
)
def test_invalid_settings_are_refused(overrides: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        Settings(_env_file=None, **overrides)


def test_the_cli_reports_bad_settings_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--warmup-sizes", "1000x1000"]) == 2
    assert "multiples of 16" in capsys.readouterr().err
    assert main(["serve", "--model", "s3://bucket/model"]) == 2
    assert "unsupported model source" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "expected"), [("1024x1024", (1024, 1024)), ("512X768", (512, 768))])
def test_parse_size(text: str, expected: tuple[int, int]) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "1024",
        "1024*1024",
        "x1024",
        "-16x16",
        "1024x1024x3",
        " 512x512",
        "512x512\n",
        "\uff15\uff11\uff12x512",
    ],
)
def test_parse_size_refuses_other_shapes(text: str) -> None:
    with pytest.raises(ValueError, match="must look like"):
        parse_size(text)


def test_an_unknown_zimage_variable_stops_the_server(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ZIMAGE_MAX_BATCHSIZE", "8")  # a typo of ZIMAGE_MAX_BATCH_SIZE
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "unknown setting ZIMAGE_MAX_BATCHSIZE" in err
    assert "serve --help" in err


def test_other_programs_variables_are_not_unknown() -> None:
    environ = {
        "ZIMAGE_MAX_QUEUE": "3",
        "zimage_port": "80",
        "ZIMAGE_CACHE_DIR": "/tmp/zimage",
        "ZIMAGE_OPERATOR_NAMESPACES": "ml",
        "ZIMAGE_QUEUE": "3",
    }
    assert unknown_variables(environ) == ["ZIMAGE_QUEUE"]


def test_api_keys_are_read_one_per_line_or_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZIMAGE_API_KEYS", "alpha, beta\ngamma\n")
    settings = Settings(_env_file=None)
    assert settings.api_keys is not None
    assert parse_keys(settings.api_keys.get_secret_value()) == {"alpha", "beta", "gamma"}
    assert "alpha" not in repr(settings), "keys must never be printed"
    with pytest.raises(ValidationError, match="holds no key"):
        Settings(_env_file=None, api_keys=" ,\n")
