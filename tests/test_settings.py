"""Decoding settings and server limits are declared once (settings.py): the CLI flags, the API's
keyword arguments, the server's form fields and its OpenAPI schema all come from there."""

from __future__ import annotations

import argparse

import pytest

from captioner.cli import build_parser
from captioner.errors import UsageError
from captioner.settings import DecodingConfig, ServeLimits


def _sub(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


def _flags(name: str) -> dict[str, argparse.Action]:
    return {o: a for a in _sub(name)._actions for o in a.option_strings}


@pytest.mark.parametrize("command", ["caption", "evaluate"])
def test_every_decoding_flag_comes_from_the_config(command):
    flags = _flags(command)
    for s in DecodingConfig.settings():
        if not s.model_default and command != "caption":
            continue
        action = flags[s.flag]
        assert action.dest == s.name and action.type is s.kind and action.help.startswith(s.help)
        if s.model_default:  # unset: the model's default, not the config's
            assert action.default is None
    model_defaults = {s.name for s in DecodingConfig.settings() if s.model_default}
    args = build_parser().parse_args([command, "x.jpg"] if command == "caption" else [command])
    assert {k for k, v in vars(args).items() if v is None} >= model_defaults


def test_the_config_checks_every_setting_and_names_the_flag_and_keyword():
    assert DecodingConfig().with_(beam_size=None, max_len=7).max_len == 7
    for s in DecodingConfig.settings():
        bad = s.low - 1
        with pytest.raises(UsageError, match=f"{s.flag}, {s.name}="):
            DecodingConfig().with_(**{s.name: bad})
    with pytest.raises(UsageError, match="unknown decoding setting.*beam_width"):
        DecodingConfig().with_(beam_width=3)
    with pytest.raises(UsageError, match="at most 4"):
        DecodingConfig(max_constraints=5)
    with pytest.raises(UsageError, match="min length 9 is more than max length 3"):
        DecodingConfig(min_len=9, max_len=3)
    assert DecodingConfig.from_dict({"beam_size": 3, "from_a_later_version": 1}).beam_size == 3


def test_the_api_takes_exactly_the_config_settings(tmp_path):
    from captioner import Captioner

    model = Captioner.load(device="cpu")
    for s in DecodingConfig.settings():  # every setting is a keyword, documented on each method
        assert model.resolve_decoding(**{s.name: s.default})[s.name] == s.default
        for method in (Captioner.caption, Captioner.generate, Captioner.decode, Captioner.caption_nbest):
            assert f"        {s.name} (" in method.__doc__
    with pytest.raises(UsageError, match="unknown decoding setting"):
        model.caption("assets/examples/cat.jpg", beam_width=3)


def test_the_server_form_and_its_openapi_schema_come_from_the_config():
    from captioner import Captioner
    from captioner.serve import create_app

    app = create_app(Captioner.load(device="cpu"), ServeLimits(max_files=3))
    schema = app.openapi()
    for route in ("/api/caption", "/api/caption-sequence"):
        body = schema["paths"][route]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert set(body["properties"]) == {*DecodingConfig.names(), "files", "tags", "attention"}
        assert (
            body["properties"]["beam_size"]["maximum"] == 20 and body["properties"]["max_constraints"]["maximum"] == 4
        )


def test_serve_limits_are_its_flags():
    flags = _flags("serve")
    for flag, name, kind, default, text in ServeLimits.flags():
        assert flags[flag].dest == name and flags[flag].type is kind and flags[flag].default == default
        assert flags[flag].help == text
    with pytest.raises(UsageError, match="--max-files"):
        ServeLimits(max_files=0)
    with pytest.raises(UsageError, match="--batch-wait-ms"):
        ServeLimits(batch_wait_ms=-1.0)


def test_the_tuning_grid_varies_decoding_settings_by_their_names():
    from dataclasses import fields

    from captioner.settings import Grid

    kinds = {s.name: s.kind for s in DecodingConfig.settings()}
    for f in fields(Grid):
        assert f.name in kinds and all(type(v) is kinds[f.name] for v in getattr(Grid(), f.name))
    for setting in Grid().settings():  # every combination is a valid configuration
        DecodingConfig().with_(**setting)
