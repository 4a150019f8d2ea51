-- The vault: one token lineage per user per issuer. Token values and claims
-- are envelopes sealed by tokenhub (never plaintext).
CREATE TABLE lineages (
    username          TEXT    NOT NULL,
    issuer            TEXT    NOT NULL,
    subject           TEXT    NOT NULL,
    access_token      BLOB    NOT NULL,
    id_token          BLOB    NOT NULL,
    refresh_token     BLOB,
    claims            BLOB    NOT NULL,
    scope             TEXT    NOT NULL,
    access_expires_at INTEGER,
    version           INTEGER NOT NULL,
    status            TEXT    NOT NULL,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    refreshed_at      INTEGER,
    -- SHA-256 of the refresh token the last refresh rotated away, and when:
    -- a late caller presenting it within a short window gets the current set.
    previous_refresh_hash TEXT,
    rotated_at        INTEGER,
    -- The refresh lease: one replica refreshes a lineage at a time.
    lease_holder      TEXT,
    lease_until       INTEGER,
    PRIMARY KEY (username, issuer)
);

-- Authorization codes issued to the hub, stored by SHA-256 hash; single use.
CREATE TABLE hub_codes (
    code_hash      TEXT    PRIMARY KEY,
    username       TEXT    NOT NULL,
    issuer         TEXT    NOT NULL,
    client_id      TEXT    NOT NULL,
    redirect_uri   TEXT    NOT NULL,
    code_challenge TEXT,
    scope          TEXT    NOT NULL,
    expires_at     INTEGER NOT NULL
);

-- Access and refresh tokens issued to the hub, stored by SHA-256 hash.
CREATE TABLE hub_tokens (
    token_hash TEXT    PRIMARY KEY,
    kind       TEXT    NOT NULL,
    username   TEXT    NOT NULL,
    issuer     TEXT    NOT NULL,
    client_id  TEXT    NOT NULL,
    scope      TEXT    NOT NULL,
    expires_at INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX hub_tokens_user ON hub_tokens (username, issuer);
