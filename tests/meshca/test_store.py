"""State directory and ledger: atomic state, init refusals, crash leftovers, single-use tokens."""

import datetime as dt
import json

import pytest

from meshca import store
from meshca.authority import Authority, init_ca
from meshca.errors import StateError

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)


def clock():
    return NOW


def test_init_then_load(tmp_path):
    state = init_ca(tmp_path / "ca", "example.org", clock)
    auth = Authority.load(tmp_path / "ca")
    assert auth.trust_domain == "example.org" == state.trust_domain
    assert auth.state == state and len(auth.roots) == 1
    assert "PRIVATE KEY" not in repr(auth) and "intermediate_key" not in repr(auth)


def test_init_twice_refuses(tmp_path):
    home = tmp_path / "ca"
    init_ca(home, clock=clock)
    before = {p.name: p.read_bytes() for p in home.iterdir()}
    with pytest.raises(StateError, match="already exists"):
        init_ca(home, clock=clock)
    assert {p.name: p.read_bytes() for p in home.iterdir()} == before


def test_init_cleans_up_after_a_crashed_init(tmp_path):
    """Files of an init that died before state.json are ours to replace; nothing else is."""
    home = tmp_path / "ca"
    home.mkdir()
    (home / "root-deadbeef.key").write_text("half")
    (home / "ledger.db").write_text("")
    init_ca(home, clock=clock)
    assert not (home / "root-deadbeef.key").exists()
    Authority.load(home)


def test_lost_and_found_is_ignored(tmp_path):
    home = tmp_path / "pvc"
    (home / "lost+found").mkdir(parents=True)
    init_ca(home, clock=clock)
    Authority.load(home)


@pytest.mark.parametrize(
    "content,why",
    [
        (b"{", "not valid JSON"),
        (b"[]", "JSON object"),
        (b'{"version": 99}', "unsupported version"),
        (b'{"version": 1}', "missing field"),
    ],
)
def test_bad_state_file(tmp_path, content, why):
    (tmp_path / "state.json").write_bytes(content)
    with pytest.raises(StateError, match=why):
        store.read_state(tmp_path)


def test_state_names_unknown_issuing_root(tmp_path):
    home = tmp_path / "ca"
    init_ca(home, clock=clock)
    doc = json.loads((home / "state.json").read_text())
    doc["issuing_root"] = "root-00000000"
    (home / "state.json").write_text(json.dumps(doc))
    with pytest.raises(StateError, match="issuing_root"):
        store.read_state(home)


def test_mismatched_key_is_detected(tmp_path):
    home = tmp_path / "ca"
    state = init_ca(home, clock=clock)
    (home / f"{state.intermediate}.key").write_bytes((home / "token-signing.key").read_bytes())
    with pytest.raises(StateError, match="does not match"):
        Authority.load(home)


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "f"
    store.atomic_write(path, b"one")
    store.atomic_write(path, b"two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_lock_is_exclusive(tmp_path):
    with store.locked(tmp_path):
        with pytest.raises(StateError, match="locked"):
            with store.locked(tmp_path, wait=False):
                pass


def rec(serial="0a", spiffe_id="spiffe://td/ns/a/sa/b"):
    return store.IssuedRecord(
        serial,
        spiffe_id,
        "2026-01-01T00:00:00.000000Z",
        "2099-01-01T00:00:00.000000Z",
        store.iso(NOW),
        "join_token",
        "01",
        "ff",
        None,
    )


def test_join_token_is_consumed_once(tmp_path):
    ledger = store.Ledger(tmp_path / "l.db", clock)
    ledger.add_join_token("j1", "spiffe://td/ns/a/sa/b", NOW + dt.timedelta(minutes=10))
    assert ledger.join_token_status("j1") == "unused"
    ledger.record_issued(rec("0a"), "j1")
    assert ledger.join_token_status("j1") == "used"
    with pytest.raises(store.TokenAlreadyUsed):
        ledger.record_issued(rec("0b"), "j1")
    assert ledger.certificate("0b") is None, "a refused consume records no certificate"
    with pytest.raises(store.UnknownToken):
        ledger.record_issued(rec("0c"), "never-minted")
    assert [r.serial for r in ledger.certificates()] == ["0a"]


def test_ledger_survives_reopen(tmp_path):
    ledger = store.Ledger(tmp_path / "l.db", clock)
    ledger.record_issued(rec("0a"))
    ledger.record_refusal(None, "none", "bad_json", "body is not valid JSON", "127.0.0.1")
    ledger.close()
    again = store.Ledger(tmp_path / "l.db", clock)
    assert again.counts()["issued"] == 1 and again.counts()["refused"] == 1
    assert again.refusals()[0]["code"] == "bad_json"


def test_a_state_in_place_whose_fsync_fails_keeps_its_files(tmp_path, monkeypatch):
    """If state.json was replaced and only the directory's fsync failed, the files it names
    are the CA's: they stay, the CA loads, and the error says the state is in place."""
    import pytest as _pytest

    from meshca.authority import Authority, init_ca
    from meshca.errors import StateError
    from meshca.rotate import rotate

    home = tmp_path / "ca"
    init_ca(home)
    first = store.read_state(home).intermediate
    start = (home / store.STATE_FILE).stat().st_mtime_ns
    real = store.fsync_dir

    def failing(path):
        if (home / store.STATE_FILE).stat().st_mtime_ns != start:
            raise OSError(5, "Input/output error")
        real(path)

    monkeypatch.setattr(store, "fsync_dir", failing)
    with _pytest.raises(StateError, match="the new state is in place"):
        rotate(home, force_intermediate=True)
    monkeypatch.setattr(store, "fsync_dir", real)
    authority = Authority.load(home)  # every file the new state names is there
    assert authority.state.intermediate != first
    assert (home / f"{authority.state.intermediate}.key").exists()
