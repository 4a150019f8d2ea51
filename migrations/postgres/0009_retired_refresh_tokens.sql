-- Refresh tokens a lineage replaced longer ago than the FABRIC broker
-- answers for (out of its newest few, or past TOKENHUB_FABRIC_GRACE), by
-- digest, for 30 days: the broker refuses them rather than passing them to
-- the Credential Manager, since an identity provider that sees a spent
-- refresh token may end the whole login. An addition: replicas of the
-- previous version keep serving beside it.
CREATE TABLE retired_refresh_tokens (
    refresh_hash TEXT    PRIMARY KEY,
    username     TEXT    NOT NULL,
    issuer       TEXT    NOT NULL,
    retired_at   BIGINT NOT NULL
);
CREATE INDEX retired_refresh_tokens_lineage ON retired_refresh_tokens (username, issuer, retired_at);
