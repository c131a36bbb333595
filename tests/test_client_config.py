"""Client configuration precedence and the manifest's crash tolerance (no server needed)."""

from __future__ import annotations

import json

import pytest

from sfpc.clients.config import load_config
from sfpc.clients.manifest import Manifest, ManifestLocked


def test_flags_beat_environment_beat_file(tmp_path):
    config = tmp_path / "client.yaml"
    config.write_text("gateway:\n  url: http://file:1\n  timeout_s: 12\n"
                      "pacs:\n  url: http://pacs-file/dicom-web\n  username: from-file\n")
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    env = {"SFPC_SERVER_URL": "http://env:2", "SFPC_PACS_PASSWORD_FILE": str(secret),
           "SFPC_PACS_VERIFY": "false", "SFPC_CLIENT_CONFIG": str(config)}
    loaded = load_config(env=env, pacs={"url": "http://flag/dicom-web", "username": None})
    assert loaded.gateway.url == "http://env:2"  # environment over file
    assert loaded.gateway.timeout_s == 12  # file over default
    assert loaded.pacs.url == "http://flag/dicom-web"  # flag over file
    assert loaded.pacs.username == "from-file"  # a None flag changes nothing
    assert loaded.pacs.password.get_secret_value() == "s3cret"  # from the _FILE, stripped
    assert loaded.pacs.verify is False
    assert "s3cret" not in repr(loaded)
    assert load_config(env={}).gateway.url == "http://127.0.0.1:8000"
    json_config = tmp_path / "client.json"
    json_config.write_text(json.dumps({"gatway": {"url": "x"}}))
    with pytest.raises(ValueError, match="unknown section 'gatway'"):
        load_config(json_config, env={})


def test_manifest_survives_a_torn_last_line_and_locks(tmp_path):
    path = tmp_path / "manifest.jsonl"
    good = {"key": "a", "status": "done"}
    path.write_text(json.dumps(good) + "\n" + '{"key": "b", "status": "subm')  # killed mid-write
    with Manifest(path) as manifest:
        assert manifest.latest("a")["status"] == "done" and manifest.latest("b") is None
        manifest.append({"key": "b", "status": "failed"})
        with pytest.raises(ManifestLocked):
            Manifest(path)
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == good
    assert lines[1] == '{"key": "b", "status": "subm'  # left as it was, on a line of its own
    assert json.loads(lines[2])["status"] == "failed"
    reopened = Manifest(path)  # the lock went with the first one
    assert reopened.latest("b")["status"] == "failed" and reopened.keys == ["a", "b"]
    reopened.close()
