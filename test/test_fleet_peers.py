"""A fleet's peers and bundles without a server: ``--harli-peers`` parsed and refused naming the bad entry,
a bundle checked before anything is written (the launcher's refusals are ``test_launcher``'s)."""

import msgspec
import pytest

from sglang_harli.core.errors import SpecError, SpecInvalid
from sglang_harli.core.fleet.bundles import AdapterBundle, bundle_digest, decode_bundle, write_bundle
from sglang_harli.core.fleet.peers import parse_peers


def test_peers_parse_and_bad_ones_are_named():
    assert parse_peers("http://a:1, http://b:2/,http://a:1,") == ["http://a:1", "http://b:2"]
    for bad in ("a:1", "ftp://a:1", "http://a:1/v1"):
        with pytest.raises(ValueError, match="base URL"):
            parse_peers(bad)


def test_a_bundle_is_checked_before_anything_is_written(tmp_path):
    files = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"\0" * 16}
    bundle = AdapterBundle(name="job", version=3, files=files, digest=bundle_digest(files))
    path = write_bundle(tmp_path, decode_bundle(msgspec.msgpack.encode(bundle)))
    assert path == tmp_path / "job" / "v0003"
    assert (path / "adapter_model.safetensors").read_bytes() == b"\0" * 16
    tampered = msgspec.structs.replace(bundle, files={**files, "adapter_config.json": b'{"r": 64}'})
    with pytest.raises(SpecError, match="digest"):
        decode_bundle(msgspec.msgpack.encode(tampered))
    planted = {"../../etc/cron.d/x": b"", **files}
    with pytest.raises(SpecError, match="not a file of an adapter"):
        decode_bundle(msgspec.msgpack.encode(msgspec.structs.replace(bundle, files=planted)))
    outside = msgspec.msgpack.encode({**msgspec.to_builtins(bundle), "name": "../x"})
    with pytest.raises(SpecInvalid) as refused:
        decode_bundle(outside)
    assert refused.value.field == "name"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job"]  # nothing else was written
