"""Runs last: no token value any test saw is in the hub's log (which holds
tokenhub's, the proxy's and the servers' output too) or the IdP's."""

from conftest import SEEN_TOKENS


def test_logs_hold_no_token_values(stack):
    assert len(SEEN_TOKENS) >= 6, "the earlier tests ran and recorded tokens"
    logs = stack.hub_log.read_text() + stack.idp_log.read_text()
    assert "tokenhub listening" in logs
    assert "token file written" in logs
    leaked = [t[:6] + "…" for t in SEEN_TOKENS if t in logs]
    assert not leaked, f"token values in the logs: {leaked}"
    database = (stack.state_dir / "tokenhub.sqlite").read_bytes()
    wal = stack.state_dir / "tokenhub.sqlite-wal"
    if wal.exists():
        database += wal.read_bytes()
    assert not [t for t in SEEN_TOKENS if t.encode() in database]
