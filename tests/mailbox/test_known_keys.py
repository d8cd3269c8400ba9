"""KnownKeys: pinned public keys, private files, the hash re-checked on every read."""

from __future__ import annotations

import os
import stat

import pytest

from duet_p2p.errors import ConfigurationError
from duet_p2p.identity import Identity, id_of
from duet_p2p.mailbox.known_keys import KeyNotPinned, KnownKeys


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_remember_and_get(tmp_path):
    keys = KnownKeys(tmp_path / "known_keys")
    host = Identity.generate()
    assert keys.remember(host.public_key) == host.id
    assert keys.get(host.id) == host.public_key
    assert host.id in keys and keys.ids() == [host.id]
    path = tmp_path / "known_keys" / f"{host.id}.pub"
    assert path.read_bytes() == host.public_key
    assert _mode(path) == 0o600 and _mode(tmp_path / "known_keys") == 0o700
    assert keys.remember(host.public_key) == host.id  # idempotent
    assert sorted(os.listdir(tmp_path / "known_keys")) == [f"{host.id}.pub"]  # no temp left
    assert keys.forget(host.id) and not keys.forget(host.id)
    assert host.id not in keys


def test_default_directory_is_in_the_data_dir():
    keys = KnownKeys()
    assert keys.directory.name == "known_keys"
    assert str(keys.directory).startswith(os.environ["DUET_HOME"])


def test_unknown_id_is_not_pinned(tmp_path):
    keys = KnownKeys(tmp_path)
    with pytest.raises(KeyNotPinned, match="no verified key is pinned"):
        keys.get("0" * 32)
    with pytest.raises(ValueError):
        keys.get("../../etc/passwd")
    with pytest.raises(ValueError):
        keys.get("A" * 32)


def test_a_substituted_key_file_is_refused(tmp_path):
    keys = KnownKeys(tmp_path)
    host, intruder = Identity.generate(), Identity.generate()
    keys.remember(host.public_key)
    path = tmp_path / f"{host.id}.pub"
    path.write_bytes(intruder.public_key)
    with pytest.raises(KeyNotPinned, match="does not hash to"):
        keys.get(host.id)
    assert host.id not in keys
    path.write_bytes(host.public_key + b"\x00")
    with pytest.raises(KeyNotPinned, match="does not hash to"):
        keys.get(host.id)
    path.write_bytes(b"")
    with pytest.raises(KeyNotPinned):
        keys.get(host.id)
    keys.remember(host.public_key)  # a verified session pins it again
    assert keys.get(host.id) == host.public_key


def test_files_others_may_write_or_links_are_refused(tmp_path):
    keys = KnownKeys(tmp_path)
    host, other = Identity.generate(), Identity.generate()
    keys.remember(host.public_key)
    path = tmp_path / f"{host.id}.pub"
    os.chmod(path, 0o622)
    with pytest.raises(KeyNotPinned, match="not a private file"):
        keys.get(host.id)
    os.chmod(path, 0o600)
    keys.remember(other.public_key)
    path.unlink()
    path.symlink_to(tmp_path / f"{other.id}.pub")
    with pytest.raises(KeyNotPinned):
        keys.get(host.id)


def test_a_directory_others_may_write_is_refused(tmp_path):
    folder = tmp_path / "keys"
    folder.mkdir(mode=0o700)
    os.chmod(folder, 0o777)
    with pytest.raises(ConfigurationError, match="chmod 700"):
        KnownKeys(folder)


def test_remember_refuses_what_is_not_a_key(tmp_path):
    keys = KnownKeys(tmp_path)
    for bad in (b"", b"\x01" * 31, b"\x01" * 33, "x" * 32, None):
        with pytest.raises(ValueError):
            keys.remember(bad)  # type: ignore[arg-type]
    identity_point = b"\x01" + bytes(31)  # small order: no usable X25519 key
    with pytest.raises(ValueError, match="usable"):
        keys.remember(identity_point)
    assert not (tmp_path / f"{id_of(identity_point)}.pub").exists()
    assert keys.ids() == []
