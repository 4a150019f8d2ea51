"""Runs last: no token value any test saw is in the hub's log (which holds
tokenhub's, the proxy's and the servers' output too) or the IdP's."""

from conftest import SEEN_TOKENS, leaked, stack_logs, vault_bytes


def test_logs_hold_no_token_values(stack):
    assert len(SEEN_TOKENS) >= 6, "the earlier tests ran and recorded tokens"
    logs = stack_logs(stack)
    assert "tokenhub listening" in logs
    assert "token file written" in logs
    assert not leaked(SEEN_TOKENS, logs), "token values in the logs"
    assert not leaked(SEEN_TOKENS, vault_bytes(stack)), "token values in the database"


def test_audit_log_holds_the_events_and_no_token_values(stack):
    import json

    path = stack.state_dir / "audit.jsonl"
    text = path.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    events = {line["event"] for line in lines}
    for event in ("login", "hub_login", "spawn", "notebook_fetch", "refresh", "revoke", "refused"):
        assert event in events, f"{event} missing from the audit log: {sorted(events)}"
    refresh = next(line for line in lines if line["event"] == "refresh")
    assert refresh["user"] and isinstance(refresh["version"], int)
    fetch = next(line for line in lines if line["event"] == "notebook_fetch")
    assert fetch["request_id"] and fetch["client"] == "127.0.0.1", fetch
    refused = [line for line in lines if line["event"] == "refused"]
    assert any("scope" in (line["detail"] or "") for line in refused), refused
    assert not leaked(SEEN_TOKENS, text), "token values in the audit log"
